"""Calibrated static int8 (precision mode `int8_static`) layer by layer: the sensitivity pass
checks each profile group quantized alone by an engine's static quantizer (ONNX Runtime's:
autotiacc.engines.ort_int8), and the groups that break the tolerance alone stay in fp32 when
the search builds an `int8_static` candidate (the precision knob's `groups`). The accuracy guard
still judges each candidate whole: errors of groups that pass alone may add up.

The check is one more mode of `profiling.sensitivity.analyse_sensitivity` (same steps, deadline and
partial profiles), but not a group mode the search samples: it lowers nothing in PyTorch.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any

from ..torch_compat import tree_flatten

STATIC_INT8 = "int8_static"


def quantizer():
    """The engine whose static quantizer checks the groups, or None where none is installed."""
    from ..engines import engines

    return next((e for e in engines().values() if e.static_int8 and hasattr(e, "int8_outputs") and e.available()),
                None)


def analysed(strategy, level: int, device: str) -> list[str]:
    """[int8_static] when the strategy searches it at this level on a CPU and a quantizer is
    installed (looked up, not imported: the tuner's process stays light); else []."""
    wanted = STATIC_INT8 in strategy.space("precision").get("mode", [])
    return [STATIC_INT8] if wanted and level >= 1 and device == "cpu" and \
        importlib.util.find_spec("onnxruntime") is not None else []


def check_group(model: Any, path: str, test: list, refs: list, tolerance: float) -> dict[str, Any]:
    """Group `path` of `model` alone in static int8, the rest fp32, on the test batches: the
    sensitivity entry ({ok, finite, rel_l2, reason}); never a quick look (no PyTorch region)."""
    import torch

    from .accuracy import compare_outputs

    try:
        outs = quantizer().int8_outputs(model, [x for x, _ in test], [path])
    except Exception as exc:  # noqa: BLE001 - a group that cannot be quantized stays fp32
        return {"ok": False, "finite": False, "rel_l2": math.inf, "quick_speedup": None,
                "reason": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    finite = all(bool(torch.isfinite(t).all()) for o in outs for t in tree_flatten(o)[0]
                 if isinstance(t, torch.Tensor) and t.is_floating_point())
    acc = compare_outputs(outs, refs, tolerance=tolerance)
    return {"ok": acc.ok and finite, "finite": finite, "rel_l2": acc.rel_l2, "quick_speedup": None,
            "reason": acc.reason if finite else "overflow: inf/NaN in the model output"}


def kept_fp32(sensitivity: list[dict[str, Any]]) -> list[str]:
    """The groups an `int8_static` candidate keeps in fp32: those whose check failed. Where no
    group was checked (no ONNX Runtime quantizer here; OpenVINO's NNCF quantizes whole models),
    those the other checks say int8 breaks (`keep_fp32_groups`)."""
    if not any(STATIC_INT8 in (g.get("sensitivity") or {}) for g in sensitivity):
        return keep_fp32_groups(sensitivity)
    return [g["path"] for g in sensitivity if (g.get("sensitivity") or {}).get(STATIC_INT8, {}).get("ok") is False]


def keep_fp32_groups(sensitivity: list[dict[str, Any]]) -> list[str]:
    """Without a check in int8_static: the groups the sensitivity pass saw leave the tolerance (or
    overflow, or raise) in int8 (`int8_dynamic`, checked on Linear groups), or, where int8 was not
    checked, in every lowered type it checked (a group that breaks in bf16 and fp16 will not
    survive int8's coarser steps). A type given up as far slower says nothing about accuracy."""
    out = []
    for group in sensitivity:
        checks = {m: r for m, r in (group.get("sensitivity") or {}).items()
                  if not str(r.get("reason", "")).startswith("far slower")}
        if "int8_dynamic" in checks:
            broke = not checks["int8_dynamic"].get("ok")
        else:
            broke = bool(checks) and not any(r.get("ok") for r in checks.values())
        if broke:
            out.append(group["path"])
    return out
