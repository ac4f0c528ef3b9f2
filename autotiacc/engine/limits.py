"""Every limit a tune sets on its own steps, derived from what it measured of the model.

Limits tuned on tiny models broke real ones: on BERT-base (270 ms a forward) a fixed 10 s limit
on a build in the final dropped an ONNX Runtime candidate the search had measured at 1.50x. So
no step here gets a fixed number of seconds: each gets what its own measured work took, times
`SLACK`, plus a process start; and never less than the same step takes the baseline, so a
candidate is never dropped by a limit that the baseline itself would miss. What is measured:

- `check_s`: the model check, before anything else (a build and a first, cold forward, in a child);
- the baseline's warm forward (`baseline_ms` of the search's trials) and each candidate's
  (`latency_ms`), and each candidate's build (`build_s`: its build and first call).

The budget is the other bound: a step past the tune's deadline is cut (`engine.fidelity`), and
the search keeps what the final needs (`final_process_s`, `final_rounds_s`) for it.
"""
from __future__ import annotations

from dataclasses import dataclass

SLACK = 3.0  # a step on a loaded 2-core machine runs up to ~3x what it took when measured (CI: 2x slower)
PROCESS_START_S = 2.0  # a worker's start: ~0.05 s forked by the zygote, ~1.5 s importing torch without it
FORK_S = 0.5  # a final process forked by the zygote, up to its first call
WARMUP_CALLS = 30  # a final process warms up for about this many forwards...
MIN_WARMUP_S, MAX_WARMUP_S = 0.3, 3.0  # ...within these bounds (it stops earlier once its calls agree)
WINDOW_CALLS = 5  # the fewest timed calls of one timing window...
REWARM_CALLS = 1  # ...after this many untimed ones (another process's window emptied the caches)
TEST_BATCHES = 4  # test batches a process checks when the tune did not say (model.py's default test data)
PROFILER_S = 3.0  # torch.profiler's set-up and the operator table's passes, on a tiny model here
FRESH_COMPILE_S = 2.0  # a compiled candidate's rebuild in a fresh process beyond its trial's build (~2.2 s here)


@dataclass(frozen=True)
class Cost:
    """What one variant costs, as measured: its build (the baseline: the model check's build and
    cold forward) and one warm forward, in seconds."""

    build_s: float = 0.0
    forward_s: float = 0.0


def warmup_s(forward_s: float) -> float:
    """How long a final process warms a variant up: `WARMUP_CALLS` forwards, within bounds."""
    return min(MAX_WARMUP_S, max(MIN_WARMUP_S, WARMUP_CALLS * forward_s))


def reference_s(baseline: Cost, test_batches: int = TEST_BATCHES) -> float:
    """A candidate process's reference: the model built, and its outputs on the test data."""
    return baseline.build_s + test_batches * baseline.forward_s


def build_s(cost: Cost | None, baseline: Cost, test_batches: int = TEST_BATCHES) -> float:
    """Expected seconds for a final process to build its variant and check it on the test data
    (None: the baseline, which builds the model alone)."""
    if cost is None:
        return FORK_S + baseline.build_s
    return FORK_S + reference_s(baseline, test_batches) + cost.build_s + test_batches * cost.forward_s


def build_limit(cost: Cost | None, baseline: Cost, test_batches: int = TEST_BATCHES) -> float:
    """The limit on that build: `SLACK` times it, never less than the baseline's own."""
    need = max(build_s(cost, baseline, test_batches), build_s(None, baseline, test_batches))
    return SLACK * need + PROCESS_START_S


def warmup_limit(forward_s: float, baseline: Cost) -> float:
    """The limit on a warm-up call: its time, or its 6 calls at least (it compares two windows of 3)."""
    own = max(warmup_s(forward_s), 6 * max(forward_s, baseline.forward_s))
    return SLACK * own + PROCESS_START_S


def window_s(window: float, forward_s: float) -> float:
    """Expected seconds of one timing window: `REWARM_CALLS`, then `window` or `WINDOW_CALLS` calls at least."""
    return REWARM_CALLS * forward_s + max(window, WINDOW_CALLS * forward_s)


def window_limit(window: float, forward_s: float, baseline: Cost, *, busy_wait_s: float = 0.0) -> float:
    """The limit on one window call (a retake after a busy window included)."""
    own = window_s(window, max(forward_s, baseline.forward_s))
    return SLACK * (2 * own + busy_wait_s) + PROCESS_START_S


def final_process_s(cost: Cost | None, baseline: Cost, test_batches: int = TEST_BATCHES) -> float:
    """Expected seconds of one final process before its windows: build and warm-up (which ends
    with the call that passes its time)."""
    forward = baseline.forward_s if cost is None else cost.forward_s
    return build_s(cost, baseline, test_batches) + warmup_s(forward) + forward


def baseline_processes(most: int, process_s: float, rounds_s: float) -> int:
    """How many processes take the baseline's windows in a final: `most`, fewer when the extra
    ones' builds and warm-ups (`process_s` each) would take more than half as long as the rounds
    (`rounds_s`): on a slow model one process's build is many windows' worth."""
    if process_s <= 0:
        return most
    return max(1, min(most, 1 + int(0.5 * rounds_s / process_s)))


def trial_limit(*, strategy_limit_s: float, share_s: float, baseline_trial_s: float | None) -> float:
    """A search trial's limit (before the budget left caps it): the strategy's `trial_timeout_s`
    and its share of the budget (`max_trial_share`), neither below `SLACK` times what the baseline
    trial took (its worker start, reference, warm-ups and timing: a candidate pays the same, plus
    its build). Before the baseline has run, the share alone."""
    floor = SLACK * baseline_trial_s if baseline_trial_s else 0.0
    return max(min(strategy_limit_s, share_s), floor)


def profile_min_s(check_s: float) -> float:
    """The least time a profile can do anything with: a worker start, the profiler's own set-up
    (`PROFILER_S`), and the model built and run in its operator table, profiler and timed passes
    (about three model checks' worth)."""
    return PROCESS_START_S + PROFILER_S + SLACK * 3 * check_s
