"""What every tune is given, whatever its task; tasks subclass it with their own part."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BudgetError, UserInputError

MIN_BUDGET_S = 10.0


@dataclass
class RunOptions:
    budget_s: float
    out_dir: Path
    storage: str | None = None  # Optuna storage URL shared by several workers; None: DIR/study.db
    study_name: str = "autotiacc"
    resume: bool = False
    seed: int = 0
    device: str = "cpu"  # auto, cpu, cuda or cuda:N
    command: str = ""  # recorded in run.json (the storage password redacted)
    heartbeat_s: int = 10  # shared storage only: a dead worker's trials fail after 3 missed beats
    started: float | None = None  # time.monotonic() when the budget started (the CLI checks the model first)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..device import resolve_device

        self.out_dir = Path(self.out_dir)
        self.device = resolve_device(self.device, allow_meta=False, name="--device")  # `auto` too
        if self.budget_s < MIN_BUDGET_S:
            raise BudgetError(f"`--budget` of {self.budget_s:.0f}s is too small to measure even the baseline; "
                              f"use at least {MIN_BUDGET_S:.0f}s (2m or more is sensible).")
        if self.heartbeat_s < 1:
            raise UserInputError(f"`--heartbeat` got {self.heartbeat_s!r}: use a whole number of seconds >= 1.")


def check_memory_limit(limit_mib: float | None, need_mib: float, *, device: str, source: str, what: str) -> None:
    """Refuse a `--max-memory` below what the baseline itself needs (`need_mib`, measured by
    the up-front check over `what`, as its trial measures it): every candidate, the baseline
    too, would be rejected, and the plan would still be the baseline, over the limit."""
    if limit_mib is not None and need_mib > limit_mib:
        raise UserInputError(f"`--max-memory` of {limit_mib:.4g} MiB is below what the baseline itself needs: "
                             f"{need_mib:.4g} MiB peak on {device} ({source}) over {what}, as its trial measures it; "
                             "give more than that, or drop --max-memory.")


def refuse_baseline_over_limit(attrs: dict[str, Any]) -> None:
    """The baseline's trial rejected over `--max-memory` (an up-front check can measure less
    than the trial: a CPU's RSS high-water mark is coarse): the limit is below its need."""
    reason = str(attrs.get("reason") or "")
    if attrs.get("status") == "rejected" and "--max-memory" in reason:
        raise UserInputError(f"`--max-memory` is below what the baseline itself needs: its trial was rejected "
                             f"({reason}); give more than its peak, or drop --max-memory.")
