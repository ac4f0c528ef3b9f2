"""The status words that cross process and task boundaries, as enums. Each is a `str` enum: it
compares equal to its word and is written as it (trials.csv, Optuna's user_attrs, plan.json),
so records made before it read the same."""
from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    def __str__(self) -> str:  # the word itself, in f-strings and CSVs, on every Python version
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class TrialStatus(_Word):
    """A trial's `status` (trials.csv, the report, `user_attrs["status"]`)."""

    OK = "ok"  # measured, within the accuracy tolerance
    PRUNED = "pruned"  # given up early: far slower than the best so far
    REJECTED = "rejected"  # measured, but over the accuracy tolerance or a memory limit
    FAILED = "failed"  # its build or call raised, crashed or ran out of memory
    TIMEOUT = "timeout"  # killed at its time limit
    DUPLICATE = "duplicate"  # a configuration already measured: its result is reused
    SKIPPED = "skipped"  # knobs that cannot combine: never built
    REQUEUED = "requeued"  # a queued starting point moved behind a retry; not a trial
    INTERRUPTED = "interrupted"  # its tune was killed while it ran; queued again on resume


NOT_TRIALS = frozenset({TrialStatus.DUPLICATE, TrialStatus.SKIPPED, TrialStatus.REQUEUED})  # nothing measured
MEASURED = frozenset({TrialStatus.OK, TrialStatus.PRUNED, TrialStatus.REJECTED})  # ran its calls


class TrialState(_Word):
    """What a task says a measured candidate gave (`TrialResult.state`): Optuna's end states."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"


class CallStatus(_Word):
    """How a call in a worker process ended (`workers.Outcome.status`)."""

    OK = "ok"
    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    CRASH = "crash"  # the process died without reporting
    OOM = "oom"  # killed by a SIGKILL nobody sent: the kernel's out-of-memory killer
    KILLED = "killed"  # stopped by us: another rank of its distributed trial failed


WORKER_LOST = frozenset({CallStatus.TIMEOUT, CallStatus.CRASH, CallStatus.OOM})  # the worker must be replaced
