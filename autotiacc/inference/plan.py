"""The plan: what a tune chose, where it was measured, and how well; versioned JSON only.

A plan is a recipe: `apply(model)` rebuilds the optimized callable from the knob configs
(tracing/compiling again on the first call). Nothing in a plan is unpickled, and knob
types resolve only from the registry.

Schema version 2 adds `shapes` (a plan tuned on a traffic mix: the bucket set and each
bucket's own knob configs, see `buckets.ShapePlan`). Version 1 plans are still read; their
`extra["shapes"]`, where version 1 kept the buckets, moves to `shapes` on reading.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HardwareMismatchWarning, PlanError, PlanMismatchError
from ..knobs import KnobConfig, all_knobs, config_from_dict, config_to_dict, describe
from ..plan_file import ENGINE_RECORDS, check_fields, check_plan_details, check_plan_header, read_plan_json
from .shapes.buckets import ShapePlan

SCHEMA = "autotiacc.plan"
SCHEMA_VERSION = 2
READS_VERSIONS = (1, 2)


@dataclass
class Plan:
    knobs: dict[str, KnobConfig]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    baseline: dict[str, Any] | None = None  # Timing.to_dict() of the final re-measurement
    best: dict[str, Any] | None = None
    speedup: float | None = None
    accuracy: dict[str, Any] | None = None
    compile_s: float | None = None
    fell_back: bool = False
    note: str = ""
    tolerance: float | None = None
    level: int | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    extra: dict[str, Any] = field(default_factory=dict)
    shapes: ShapePlan | None = None  # tuned on traffic: buckets, each with its own configs
    # Whether `speedup` can be trusted: False when the machine was busy while it was measured or
    # its rounds spanned too much (`reliability["reasons"]`, see `machine_load`); None: not judged
    reliable: bool | None = None
    reliability: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return describe(self.knobs) + (f"; {self.shapes.label}" if self.shapes else "")

    @property
    def keeps_baseline(self) -> bool:
        """The plan changes nothing: every knob at its default, no shape buckets."""
        return self.shapes is None and all(self.knobs.get(k.name, k.default()) == k.default() for k in all_knobs())

    @property
    def unreliable(self) -> str:
        """"not reliable: <why>" when its figure cannot be trusted, else ""."""
        from ..machine_load import unreliable_text

        return unreliable_text(self.reliability) if self.reliable is False else ""

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from ..version import __version__

        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "autotiacc_version": __version__,
            "created": self.created, "device": self.device, "fingerprint": self.fingerprint,
            "workload": self.workload, "knobs": [config_to_dict(c) for c in self.knobs.values()],
            "label": self.label, "baseline": self.baseline, "best": self.best, "speedup": self.speedup,
            "accuracy": self.accuracy, "compile_s": self.compile_s, "fell_back": self.fell_back,
            "note": self.note, "tolerance": self.tolerance, "level": self.level, "extra": self.extra,
            "shapes": self.shapes.to_dict() if self.shapes else None,
            "reliable": self.reliable, "reliability": self.reliability,
        }

    @classmethod
    def from_dict(cls, d: Any, *, origin: str = "plan") -> "Plan":
        """Check every field a plan is read for, then build it; anything else is a `PlanError`
        naming `origin` (nothing in the file is imported, run or unpickled)."""
        check_plan_header(d, SCHEMA, READS_VERSIONS, origin, what="plan", retune="autotiacc tune")
        if not isinstance(d.get("knobs"), list):
            raise PlanError(f"{origin}: `knobs` must be a list of knob entries.")
        keys = ("fingerprint", "workload", "device", "baseline", "best", "speedup", "accuracy", "compile_s",
                "fell_back", "note", "tolerance", "level", "created", "extra", "reliable", "reliability")
        fields = {k: d[k] for k in keys if k in d and d[k] is not None}
        check_fields(cls, fields, origin)
        check_plan_details(fields, origin)
        try:
            configs = [config_from_dict(k) for k in d["knobs"]]
        except PlanError as exc:
            raise PlanError(f"{origin}: {exc}") from None
        by_name = {}
        for knob in all_knobs():
            match = [c for c in configs if isinstance(c, knob.config_cls)]
            if len(match) > 1:
                raise PlanError(f"{origin}: `knobs` lists {knob.config_cls.__name__} {len(match)} times; a plan has one "
                                "entry per knob.")
            by_name[knob.name] = match[0] if match else knob.default()
        extra = dict(fields.pop("extra", {}))
        try:
            if d["schema_version"] == 1:  # version 1 kept the buckets among the free-form extras
                shapes = ShapePlan.from_v1(extra.pop("shapes")) if extra.get("shapes") is not None else None
            else:
                shapes = ShapePlan.from_dict(d["shapes"]) if d.get("shapes") is not None else None
        except PlanError as exc:
            raise PlanError(f"{origin}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - data only: whatever is wrong in it is a malformed plan
            raise PlanError(f"{origin}: `shapes` is malformed ({type(exc).__name__}: {exc}).") from None
        if shapes is not None:  # the serving figures apply reads, typed like the rest
            check_fields(ShapePlan, {k: getattr(shapes, k) for k in ("serve_batch", "p99_budget_ms")
                                     if getattr(shapes, k) is not None}, origin)
        return cls(knobs=by_name, extra=extra, shapes=shapes, **fields)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a plan
        return path

    # -- use -----------------------------------------------------------------------------
    def check_fingerprint(self, *, strict: bool = False, device: str | None = None) -> list[str]:
        """Compare the recorded fingerprint with this machine; warn, or raise when strict."""
        from ..hardware import fingerprint, fingerprint_differences

        if not self.fingerprint:
            return []
        diffs = fingerprint_differences(self.fingerprint, fingerprint(device or self.device))
        if diffs:
            msg = "plan was measured on other hardware/software: " + "; ".join(diffs)
            if strict:
                raise PlanMismatchError(msg + ". Re-tune here, or pass strict=False to apply it anyway.")
            warnings.warn(msg + ". Its speed-up may not hold here.", HardwareMismatchWarning, stacklevel=3)
        env = {k: v for k, v in (self.extra.get("measured_env") or {}).items() if os.environ.get(k) != v}
        if env:  # OpenMP and allocators read these once at start; they change speed (see engine/fidelity.py)
            def show(v: str | None) -> str:
                return "unset" if v is None else repr(v)

            warnings.warn("plan was measured with " + ", ".join(f"{k} {show(v)}" for k, v in env.items())
                          + "; this process has " + ", ".join(f"{k} {show(os.environ.get(k))}" for k in env)
                          + ". Its speed-up may not hold here; set them as measured before Python starts.",
                          HardwareMismatchWarning, stacklevel=3)
        return diffs

    def apply(self, model: Any, example_inputs: tuple | None = None, *, strict: bool = False,
              device: str | None = None, pad_inputs: Any = None, unpad_outputs: Any = None,
              calibration_data: Any = None):
        """Return the optimized callable for `model` (built on the first call if no inputs given);
        a plan that keeps the baseline (`keeps_baseline`) returns `model` itself.

        A plan with calibrated int8 (`int8_static`) takes its activation scales from
        `calibration_data` (input tuples: those of the test data the tune used,
        `[x for x, _ in test_data()]`); without them it calibrates on the first call's inputs and
        warns (the artifact, `load_artifact`, keeps the scales the tune measured).

        A plan tuned on traffic returns a `BucketedModel` dispatcher; when its buckets pad dims
        other than the batch, pass your model file's `pad_inputs` (and optional `unpad_outputs`):
        a plan never imports the model.py it records.

        The model (and `example_inputs`) are moved to `device`, by default the plan's; a plan made
        for CUDA raises `PlanError` in a process without it unless `device="cpu"` is given."""
        from ..device import to_device
        from .candidate import OptimizedModel

        device = self.target_device(device)
        self.check_fingerprint(strict=strict, device=device)
        model = to_device(model, device)
        if example_inputs is not None:
            example_inputs = to_device(tuple(example_inputs), device)
        if hasattr(model, "eval"):
            model.eval()
        if self.keeps_baseline:  # nothing to apply: a wrapper would only cost every call
            return model
        if self.shapes is not None:
            from .shapes.bucketed import bucketed_from_plan

            return bucketed_from_plan(self, model, device=device, pad_inputs=pad_inputs,
                                      unpad_outputs=unpad_outputs)
        calibration = [to_device(tuple(x), device) for x in calibration_data] if calibration_data is not None else None
        records = self.engine_records()
        mode = getattr(self.knobs.get("precision"), "mode", "")
        if mode == "int8_static" and calibration is None and "int8_static" not in records:  # no scales to replay
            warnings.warn("the plan's int8_static scales are calibrated on the first call's inputs, not on the test "
                          "data the tune used: pass calibration_data=[x for x, _ in test_data()] to get the accuracy "
                          "it measured, or serve its artifact (load_artifact).", UserWarning, stacklevel=2)
        return OptimizedModel(model, self.knobs, example_inputs=example_inputs, device=device, calibration=calibration,
                              recorded=records)

    def engine_records(self) -> dict[str, Any]:
        """What the build of the plan's candidate recorded for its engine to replay, by kind
        (`int8_static`: the calibrated scales and quantizer settings, `engines.ort_int8`)."""
        return {k: self.extra[k] for k in ENGINE_RECORDS if isinstance(self.extra.get(k), dict)}

    def target_device(self, device: str | None = None) -> str:
        """`device` (checked), else the device the plan was made for, if this process has it."""
        from ..device import resolve_device
        from ..errors import UserInputError

        if device is not None:
            return resolve_device(device, name="device")
        try:
            return resolve_device(self.device, name="device")
        except UserInputError:
            raise PlanError(f"the plan was made for `{self.device}` and this process has no such device; pass "
                            "device='cpu' to apply it on the CPU (its figures were measured on the GPU), or "
                            "re-tune here.") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_plan(path: str | Path) -> Plan:
    """Read a plan file; a missing, corrupt or wrong-schema file raises `PlanError`."""
    p, data = read_plan_json(path)
    return Plan.from_dict(data, origin=str(p))
