"""What inference and training plan files share: reading the JSON, the schema header, and the
checks of the top-level and nested fields, so a bad value fails on load, naming the file."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config_io import field_type_errors, matches_type, type_name
from .errors import PlanError

ENGINE_RECORDS = ("int8_static",)  # `extra` keys an engine's build recorded and replays (int8 scales)
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")  # a workload's input dtypes


# Nested fields a plan is read for (by verify, apply, load_artifact), with their types.
_WORKLOAD_FIELDS = {"name": str, "kind": str, "file": str, "file_sha256": str, "param_shapes_sha256": str,
                    "batch_size": int | None, "input_shapes": list[list[int]], "input_dtypes": list[str]}
_ARTIFACT_FIELDS = {"file": str, "format": str, "sha256": str, "error": str, "input_shapes": list[list[int]],
                    "runtime": dict[str, Any], "cuda_graphs": dict[str, Any], "engine_options": dict[str, Any],
                    "int8_static": dict[str, Any], "extra_files": dict[str, str]}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:\d+)?")


# What to say when a plan of the other kind is handed over (`verify` of a training plan).
_OTHER_PLANS = {
    "autotiacc.training_plan": "this is a training plan (from `tune --mode train`), not an inference plan; apply it "
                               "in your training loop with autotiacc.training.load_training_plan(path) and "
                               "autotiacc.training.apply(plan, model, optimizer, dataset, loss_fn) (`verify` and "
                               "load_plan take inference plans).",
    "autotiacc.plan": "this is an inference plan, not a training plan; load it with autotiacc.load_plan(path) and "
                      "plan.apply(model), or re-measure it with `autotiacc verify`.",
}


def check_plan_header(d: Any, schema: str, version: int | tuple[int, ...], origin: str, *, what: str,
                      retune: str) -> None:
    """The schema name and version (or the versions read), shared by inference and training plans."""
    versions = (version,) if isinstance(version, int) else tuple(version)
    found = d.get("schema") if isinstance(d, dict) else None
    other = _OTHER_PLANS.get(found) if isinstance(found, str) and found != schema else None
    if other:
        raise PlanError(f"{origin}: {other}")
    if not isinstance(d, dict) or d.get("schema") != schema:
        raise PlanError(f"{origin}: not an autotiacc {what} (missing \"schema\": \"{schema}\").")
    got = d.get("schema_version")
    if got not in versions or isinstance(got, bool):
        shown = got if isinstance(got, int) else repr(str(got)[:40])
        raise PlanError(f"{origin}: {what} schema version {shown} is not supported by this autotiacc "
                        f"(reads version {' or '.join(map(str, versions))}); re-run `{retune}`.")


def check_fields(cls: type, fields: dict[str, Any], origin: str) -> None:
    """Every top-level field against the dataclass annotation of the plan class."""
    wrong = field_type_errors(cls, fields)
    if wrong:
        raise PlanError(f"{origin}: " + "; ".join(wrong) + ".")


def _check_nested(value: Any, spec: dict[str, Any], where: str, origin: str) -> None:
    for key, hint in spec.items():
        if isinstance(value, dict) and value.get(key) is not None and not matches_type(value[key], hint):
            raise PlanError(f"{origin}: `{where}.{key}` got {str(value[key])[:60]!r} ({type(value[key]).__name__}), "
                            f"expected {type_name(hint)}.")


def check_plan_details(fields: dict[str, Any], origin: str) -> None:
    """Ranges and the nested fields read later, so a bad value fails here, naming the file."""
    if "device" in fields and not _DEVICE.fullmatch(fields["device"]):
        raise PlanError(f"{origin}: `device` got {fields['device'][:40]!r}: expected cpu, cuda or cuda:N.")
    if fields.get("level") not in (None, 0, 1, 2):
        raise PlanError(f"{origin}: `level` got {fields['level']!r}: expected 0, 1 or 2.")
    for key in ("speedup", "tolerance", "compile_s"):
        if key in fields and not fields[key] >= 0:
            raise PlanError(f"{origin}: `{key}` got {fields[key]!r}: expected a number >= 0.")
    _check_nested(fields.get("workload"), _WORKLOAD_FIELDS, "workload", origin)
    wl = fields.get("workload") or {}
    if any(n <= 0 for n in [wl.get("batch_size") or 1, *(d for s in wl.get("input_shapes") or [] for d in s)]):
        raise PlanError(f"{origin}: `workload` batch size and input shapes must be positive sizes.")
    bad = [d for d in wl.get("input_dtypes") or [] if d not in INPUT_DTYPES]
    if bad:
        raise PlanError(f"{origin}: `workload.input_dtypes` got {bad[0][:40]!r}: expected one of {', '.join(INPUT_DTYPES)}.")
    extra = fields.get("extra") or {}
    _check_nested(extra, {"measured_env": dict[str, str | None], "artifact": dict[str, Any], "shapes": dict[str, Any],
                          **{k: dict[str, Any] for k in ENGINE_RECORDS}}, "extra", origin)
    _check_nested(extra.get("shapes"), {"edges": dict[str, list[int]], "axes": dict[str, list[list[int]]]},
                  "extra.shapes", origin)
    artifact = extra.get("artifact") or {}
    _check_nested(artifact, _ARTIFACT_FIELDS, "extra.artifact", origin)
    name = artifact.get("file")
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise PlanError(f"{origin}: `extra.artifact.file` got {name[:60]!r}: an artifact is a file name inside the "
                        "run directory, not a path.")


def read_plan_json(path: str | Path, what: str = "plan") -> tuple[Path, Any]:
    """The JSON of a plan file (or of `plan.json` in a run directory); errors are `PlanError`."""
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    if not p.is_file():
        raise PlanError(f"{p}: no such {what} file.")
    try:
        return p, json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{p}: not valid JSON ({exc}); a plan is the plan.json a tune wrote.") from None
    except RecursionError:
        raise PlanError(f"{p}: not a plan (nested too deeply to read); a plan is the plan.json a tune wrote.") from None
    except OSError as exc:
        raise PlanError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
