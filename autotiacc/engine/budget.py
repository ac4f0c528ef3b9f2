"""Where a tune's budget went: profile, builds, timing, the rest of each trial (worker start,
baseline, accuracy check, a trial that failed or timed out), the final re-measurement and
everything else (checking the model, Optuna, writing records, idle).

Recorded in run.json per session (`sessions[-1].budget`) and shown in the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("profile_s", "build_s", "timing_s", "trial_other_s", "final_s", "other_s")


@dataclass
class Budget:
    """The deadline and the ledger of one session."""

    budget_s: float
    t_start: float = field(default_factory=time.monotonic)  # when the budget started
    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES[:-1], 0.0))
    trials_s: float = 0.0

    @property
    def deadline(self) -> float:
        return self.t_start + self.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def add(self, category: str, seconds: float | None) -> None:
        if seconds:
            self.spent[category] += max(0.0, float(seconds))

    def add_trial(self, attrs: dict[str, Any]) -> None:
        """A measured trial: its build and timing seconds, and the rest of its wall time."""
        wall = float(attrs.get("wall_s") or 0.0)
        build, timing = float(attrs.get("build_s") or 0.0), float(attrs.get("measure_s") or 0.0)
        self.trials_s += wall
        self.add("build_s", build)
        self.add("timing_s", timing)
        self.add("trial_other_s", wall - build - timing)

    def summary(self) -> dict[str, float]:
        wall = self.elapsed()
        out = {k: round(v, 2) for k, v in self.spent.items()}
        out["other_s"] = round(max(0.0, wall - sum(self.spent.values())), 2)
        out["wall_s"] = round(wall, 2)
        return out
