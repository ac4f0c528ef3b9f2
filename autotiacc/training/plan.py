"""The training plan: versioned JSON like the inference plan (no pickle, allowlisted configs)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..machine_load import unreliable_text
from ..plan_file import check_fields, check_plan_details, check_plan_header, read_plan_json
from .config import TrainConfig

SCHEMA = "autotiacc.training_plan"
SCHEMA_VERSION = 1


@dataclass
class TrainingPlan:
    config: TrainConfig = field(default_factory=TrainConfig)
    batch_size: int | None = None
    nproc: int = 1
    fingerprint: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    baseline: dict[str, Any] | None = None  # {"samples_per_s", "window_ms": Timing dict, ...}
    best: dict[str, Any] | None = None
    speedup: float | None = None
    fell_back: bool = False
    note: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    extra: dict[str, Any] = field(default_factory=dict)
    reliable: bool | None = None  # as the inference plan's: False when its figure cannot be trusted
    reliability: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.config.label()

    @property
    def unreliable(self) -> str:
        """"not reliable: <why>" when its figure cannot be trusted, else ""."""
        return unreliable_text(self.reliability) if self.reliable is False else ""

    def to_dict(self) -> dict[str, Any]:
        from ..version import __version__

        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "autotiacc_version": __version__,
                "created": self.created, "device": self.device, "nproc": self.nproc, "batch_size": self.batch_size,
                "fingerprint": self.fingerprint, "workload": self.workload, "knobs": self.config.to_list(),
                "label": self.label, "baseline": self.baseline, "best": self.best, "speedup": self.speedup,
                "fell_back": self.fell_back, "note": self.note, "extra": self.extra, "reliable": self.reliable,
                "reliability": self.reliability}

    @classmethod
    def from_dict(cls, d: Any, *, origin: str = "plan") -> "TrainingPlan":
        check_plan_header(d, SCHEMA, SCHEMA_VERSION, origin, what="training plan (inference plans are read with "
                          "autotiacc.load_plan)", retune="autotiacc tune --mode train")
        keys = ("batch_size", "nproc", "fingerprint", "workload", "device", "baseline", "best", "speedup",
                "fell_back", "note", "created", "extra", "reliable", "reliability")
        fields = {k: d[k] for k in keys if d.get(k) is not None}
        check_fields(cls, fields, origin)
        check_plan_details(fields, origin)
        if fields.get("nproc", 1) < 1 or fields.get("batch_size", 1) < 1:
            raise PlanError(f"{origin}: `nproc` and `batch_size` must be positive.")
        try:
            config = TrainConfig.from_list(d.get("knobs"))
        except PlanError as exc:
            raise PlanError(f"{origin}: {exc}") from None
        return cls(config=config, **fields)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        return path


def load_training_plan(path: str | Path) -> TrainingPlan:
    p, data = read_plan_json(path, "training plan")
    return TrainingPlan.from_dict(data, origin=str(p))


def as_config(plan: Any) -> TrainConfig:
    """Accept a TrainingPlan, TrainConfig, path to plan.json / run dir, or None (the baseline)."""
    if plan is None:
        return TrainConfig()
    if isinstance(plan, TrainConfig):
        return plan
    if isinstance(plan, TrainingPlan):
        return plan.config
    if isinstance(plan, (str, Path)):
        return load_training_plan(plan).config
    raise PlanError(f"`plan` got {type(plan).__name__}: pass a TrainingPlan, a TrainConfig, a plan.json path "
                    "or None (the baseline).")


def plan_batch_size(plan: Any) -> int | None:
    if isinstance(plan, TrainingPlan):
        return plan.batch_size
    if isinstance(plan, (str, Path)):
        return load_training_plan(plan).batch_size
    return None
