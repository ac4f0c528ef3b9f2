"""The interface between the engine's one search loop and a kind of tune (inference, training).

A task knows its workload, its search space and how to measure a candidate; the engine knows
the study, the budget, duplicates, patience, the final choice and the run directory.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..measure import Timing
from .status import TrialState
from .storage import Direction


@dataclass
class Candidate:
    """One sampled configuration. `key` identifies it for duplicate detection; `skip` is a
    reason it cannot run (incompatible knobs), so it is recorded and not measured."""

    values: Any
    label: str
    key: str
    is_baseline: bool = False
    skip: str | None = None


@dataclass
class TrialResult:
    """What a measured candidate gave. `state` is complete | pruned | fail; `value` is Optuna's
    objective (complete only); `attrs` (status, reason, wall_s, build_s, measure_s, figures)
    become the trial's user attributes and trials.csv columns."""

    state: TrialState
    value: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinalMeasure:
    """The final re-measurement: the baseline's timing and, per trial number, the candidate's
    status, timing (None unless it ran) and task-specific result."""

    baseline: Timing
    candidates: dict[int, tuple[str, Timing | None, dict[str, Any]]]


@dataclass
class Decision:
    """The engine's choice at the end, handed to `Task.make_plan`.

    kind: `winner` (trial beat the baseline beyond noise in the final re-measurement),
    `not_faster` (best candidate within noise: keep the baseline), `final_failed` (the final
    re-measurement failed: keep the search's best, `trial`, with its search figures),
    `all_failed` (every re-measured candidate failed; `trial` is the search's best) or
    `nothing` (no candidate faster than the baseline to re-measure).
    """

    kind: str
    trial: Any = None  # optuna FrozenTrial of the chosen/best candidate
    final: FinalMeasure | None = None
    result: dict[str, Any] | None = None  # the chosen candidate's final result
    timing: Timing | None = None
    reason: str = ""

    @property
    def fell_back(self) -> bool:
        return self.kind in ("not_faster", "all_failed", "nothing")


class Task(ABC):
    """One kind of tune, served by `engine.loop.Search`.

    Call order, all in the tuner's process:

    0. `validate(left_s)` once, before anything is written: the user's file loads and runs.
    1. `identity()` and `fingerprint()`: what the study is checked against on resume (another
       machine, model, batch size or input shapes is refused) and what run.json records.
    2. `prepare(run_dir, left_s)` once, after the run directory is locked and the study checked:
       profile (at most its share of the budget), fix the search space. Returns the seconds it
       spent profiling (budget accounting).
    3. `seeds()` once when the study is new: Optuna params to enqueue, the baseline first.
    4. `start_search()`, then per trial: `propose(trial)` samples a `Candidate` with Optuna (ask/tell: it is measured
       elsewhere); unless skipped or a duplicate, `evaluate(trial, candidate, timeout, best)`
       measures it in a worker and returns a `TrialResult`; a crash, hang or OOM is a failed
       result, never an exception.
    5. `final_reserve(tops, pending=True)` before each trial: seconds kept for the end (the
       trial about to run may join `tops`); `end_search()` after the last one.
    6. `final(tops, timeout)` once: re-measure the top trials side by side with the baseline;
       returns a `FinalMeasure`, or a reason string when it failed as a whole.
    7. `make_plan(decision, study)` once: the plan object (`save`, `to_dict`, `label`,
       `speedup`, `note`), from the engine's `Decision`.
    8. `close()` always, last: stop the task's workers.

    `direction` is Optuna's ("minimize" for a latency ratio, "maximize" for a speed-up);
    `gain(value)` turns an objective value into a speed-up (higher is better) for patience
    and the choice of the top candidates.
    """

    mode: str = "task"  # run.json's `mode`
    strategy_name: str = ""
    baseline_label: str = "baseline"  # the label of the baseline trial (older studies lack the flag)
    direction: Direction = "minimize"
    final_top_k: int = 3

    def gain(self, value: float) -> float:
        return 1.0 / value if self.direction == "minimize" else value

    def validate(self, left_s: float) -> None:
        """Raise a one-line error for a broken workload before the run directory is touched
        (the user's code runs within `left_s`)."""

    @abstractmethod
    def prepare(self, run_dir, left_s: float) -> float:
        ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        ...

    def opened(self, study) -> None:
        """The study is open and checked (called once, before `seeds`)."""

    def study_attrs(self) -> dict[str, Any]:
        """Extra study user attributes (the strategy, the level...)."""
        return {}

    def run_record(self) -> dict[str, Any]:
        """Mode-specific fields of run.json (strategy, level, tolerance, nproc...)."""
        return {}

    @abstractmethod
    def seeds(self) -> list[dict[str, Any]]:
        ...

    def start_search(self) -> None:
        """Before the first trial: start warm workers."""

    def end_search(self, study) -> None:
        """After the last trial, before the final re-measurement: stop warm workers, so nothing
        else runs beside the final timing; raise when the budget measured nothing at all."""

    @abstractmethod
    def propose(self, trial) -> Candidate:
        ...

    @abstractmethod
    def evaluate(self, trial, candidate: Candidate, *, timeout: float, best_gain: float) -> TrialResult:
        ...

    def check_baseline(self, result: TrialResult, budget_s: float) -> None:
        """Raise when the baseline could not be measured and nothing else can mean anything."""

    def trial_timeout(self, left_s: float, budget_s: float, candidate: Candidate) -> float:
        return left_s

    def final_candidates(self, tops: list, trials: list) -> list:
        """Trials added to the final re-measurement beside the top ones."""
        return []

    def family(self, values: dict[str, Any]) -> Any:
        """What the final re-measurement tells apart: of trials of one family only the best in
        the search is re-measured. None (the default): every configuration is its own family."""
        return None

    def final_group(self, values: dict[str, Any]) -> Any:
        """Families the search may rank unfairly against each other (inference: backends, whose
        latency depends unequally on the process's allocation history): the final takes the best
        family of each group first, then the next families. None (the default): no groups."""
        return None

    @abstractmethod
    def final_reserve(self, tops: list, *, pending: bool = False, least: bool = False) -> float:
        """Seconds the final re-measurement of `tops` needs; `pending`: a trial about to run may
        join them (the search keeps that much before it starts one); `least`: only what the final
        cannot do without (it cuts the rest to fit the time it gets)."""

    @abstractmethod
    def final(self, tops: list, timeout: float) -> FinalMeasure | str:
        ...

    @abstractmethod
    def make_plan(self, decision: Decision, study) -> Any:
        ...

    def close(self) -> None:
        """Stop workers; called once at the end, also after an error."""
