"""Per-layer precision: lower chosen submodules only, and find which ones can be lowered.

A group is a submodule path from the profile (`autotiacc.profile.candidate_groups`). Lowering
wraps it in a `PrecisionRegion` (autotiacc.knobs.precision_groups, where the precision knob
applies it too).

`analyse_sensitivity` runs before the search (in an isolated process): it lowers one group at
a time in each type, and records the output error and whether anything became inf/NaN. The
search then offers each group only the types it survived, ranked by time share per error;
a short interleaved look at each survivor's speed picks one of the search's starting points.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

from ..knobs.precision_groups import LOWERED_MODES, apply_group_precision, param_name

SEARCHED_GROUPS = 6  # at most this many groups get an Optuna parameter each


def modes_for(group: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """The lowered modes worth trying on `group`: the allowed ones, int8 only for a Linear."""
    allowed = set(allowed)
    return [m for m in LOWERED_MODES if m in allowed and (m != "int8_dynamic" or group.get("linear"))]


def _finite(obj: Any) -> bool:
    import torch
    import torch.utils._pytree as pytree

    return all(bool(torch.isfinite(t).all()) for t in pytree.tree_flatten(obj)[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def analyse_sensitivity(workload, groups: list[dict[str, Any]], *, modes: list[str], tolerance: float,
                        device: str = "cpu", time_limit_s: float | None = None) -> list[dict[str, Any]]:
    """Lower one group at a time in each mode; return the groups with a `sensitivity` entry
    per mode ({rel_l2, finite, ok, reason}), `allowed` modes and a `score` (time share per
    unit of the smallest allowed error; 0 when nothing is allowed), best score first.

    Runs the model on the workload's test data; meant to run inside `run_isolated`. Groups
    left when `time_limit_s` has passed are not analysed (nothing allowed, `skipped` says why).
    """
    import time

    import torch

    from ..device import to_device
    from .accuracy import compare_outputs

    model = to_device(workload.build_model(), device)
    test = to_device(list(workload.test_data()), device)
    with torch.no_grad():
        refs = [model(*x) for x, _ in test]
    out = []
    inputs = to_device(workload.example_inputs(), device)
    deadline = time.monotonic() + time_limit_s if time_limit_s is not None else None
    for group in groups:
        entry = dict(group, sensitivity={}, allowed=[])
        if deadline is not None and time.monotonic() > deadline:
            entry.update(score=0.0, skipped=f"not analysed: the {time_limit_s:.0f} s for the analysis ran out")
            out.append(entry)
            continue
        for mode in modes_for(group, modes):
            # checked per mode: one group's modes took 14 s here (fp16 on a CPU), enough to
            # overrun the worker's timeout and lose the whole profile
            if deadline is not None and time.monotonic() > deadline:
                entry["skipped"] = f"partly analysed: the {time_limit_s:.0f} s for the analysis ran out"
                break
            entry["sensitivity"][mode] = _try_mode(model, group["path"], mode, test, refs, tolerance, device,
                                                   compare_outputs, inputs)
            if entry["sensitivity"][mode]["ok"]:
                entry["allowed"].append(mode)
        errors = [entry["sensitivity"][m]["rel_l2"] for m in entry["allowed"]]
        entry["score"] = group.get("inclusive_share", 0.0) / max(min(errors), 1e-6) if errors else 0.0
        out.append(entry)
    out.sort(key=lambda g: -g["score"])
    return out


def _quick_speedup(model, lowered, inputs, device: str) -> float:
    """A short interleaved look (the one harness) at what lowering this group alone gains;
    a hint for where to start the search, never a figure in the plan."""
    import torch

    from ..measure import measure_interleaved

    with torch.no_grad():
        t = measure_interleaved({"fp32": lambda: model(*inputs), "lowered": lambda: lowered(*inputs)}, device,
                                min_rounds=5, target_s=0.15, warmup_s=0.1)
    return t["fp32"].median / t["lowered"].median


def _try_mode(model, path, mode, test, refs, tolerance, device, compare_outputs, inputs) -> dict[str, Any]:
    import torch

    seen = {"group_finite": True}
    try:
        lowered = apply_group_precision(copy.deepcopy(model), [(path, mode)], device)
        region = lowered.get_submodule(path)
        # the group's own output: an overflow here can be hidden downstream (e.g. by a clamp)
        region.inner.register_forward_hook(lambda m, a, o: seen.__setitem__(
            "group_finite", seen["group_finite"] and _finite(o)))
        with torch.no_grad():
            outs = [lowered(*x) for x, _ in test]
    except Exception as exc:  # noqa: BLE001 - a mode that cannot run on this group is excluded
        return {"ok": False, "finite": False, "rel_l2": math.inf,
                "reason": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    finite = seen["group_finite"] and all(_finite(o) for o in outs)
    acc = compare_outputs(outs, refs, tolerance=tolerance)
    if not finite:
        return {"ok": False, "finite": False, "rel_l2": acc.rel_l2 if math.isfinite(acc.rel_l2) else math.inf,
                "reason": "overflow: inf/NaN in " + ("the group's output" if not seen["group_finite"] else "the model output")}
    res = {"ok": acc.ok, "finite": True, "rel_l2": acc.rel_l2, "reason": acc.reason}
    if acc.ok:
        res["quick_speedup"] = _quick_speedup(model, lowered, inputs, device)
    return res


def search_groups(sensitivity: list[dict[str, Any]], limit: int = SEARCHED_GROUPS) -> list[dict[str, Any]]:
    """The groups the search samples: those with at least one allowed mode, best score first,
    each with its fixed choice list (fp32 first, then its allowed modes in GROUP_MODES order)."""
    picked = [g for g in sensitivity if g.get("allowed")][:limit]
    return [{"path": g["path"], "choices": ["fp32"] + [m for m in LOWERED_MODES if m in g["allowed"]]}
            for g in picked]


def enqueue_params(groups: list[dict[str, Any]], sensitivity: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Stage-1 starting points for per-layer precision (Optuna params; global mode fp32):
    every searched group at its least-error allowed mode; and every group at the mode whose
    quick look was fastest, where that beat fp32 by 5 % or more (others stay fp32)."""
    if not groups:
        return []
    by_path = {g["path"]: g for g in sensitivity}
    accurate, fast = {}, {}
    for g in groups:
        sens = by_path[g["path"]]["sensitivity"]
        lowered = [m for m in g["choices"] if m != "fp32"]
        accurate[param_name(g["path"])] = min(lowered, key=lambda m: sens[m]["rel_l2"])
        quickest = max(lowered, key=lambda m: sens[m].get("quick_speedup", 0.0))
        fast[param_name(g["path"])] = quickest if sens[quickest].get("quick_speedup", 0.0) >= 1.05 else "fp32"
    starts = [accurate]
    if fast != accurate and any(m != "fp32" for m in fast.values()):
        starts.append(fast)
    return starts


def default_group_modes(strategy, level: int) -> list[str]:
    """Group modes the search may use: the strategy's `precision.group_modes`, else the
    lowered global modes it lists (per-layer int8 too, for Linear groups); none at level 0."""
    if level < 1:
        return []
    space = strategy.space("precision")
    if "group_modes" in space:
        return [m for m in LOWERED_MODES if m in space["group_modes"]]
    listed = space.get("mode", [])
    return [m for m in LOWERED_MODES if m in listed and m != "int8_dynamic"] + ["int8_dynamic"]


def profile_for_search(workload, *, device: str = "cpu", modes: list[str], tolerance: float,
                       target_s: float = 1.0, time_limit_s: float | None = None) -> dict[str, Any]:
    """Profile, then (when `modes`) the sensitivity analysis of the profile's groups. Runs in
    an isolated process, so it is timed in the same environment as the trials."""
    import time

    from ..profile import profile_workload

    t0 = time.monotonic()
    prof = profile_workload(workload, device=device, target_s=target_s)
    prof["sensitivity"], prof["search_groups"] = [], []
    if modes and prof.get("groups"):
        left = None if time_limit_s is None else max(0.0, time_limit_s - (time.monotonic() - t0))
        prof["sensitivity"] = analyse_sensitivity(workload, prof["groups"], modes=modes, tolerance=tolerance,
                                                  device=device, time_limit_s=left)
        prof["search_groups"] = search_groups(prof["sensitivity"])
    return prof


MIN_PROFILE_S = 5.0  # less than this for the profile (a short budget): skip it; a worker barely starts in it


def prepare_search(workload, run_dir, *, device: str, level: int, strategy, tolerance: float,
                   timeout: float, resume: bool = False) -> dict[str, Any]:
    """The tune's profiling step: profile and sensitivity analysis in one isolated process,
    written to `profile.json`; returns SearchContext extras for the precision knob. A failed
    or timed-out profile is recorded and the tune goes on without per-layer groups.

    On `--resume` the saved profile is reused so every group keeps the same Optuna choices.
    """
    from pathlib import Path

    from ..engine.workers import run_isolated
    from ..profile import PROFILE_FILE, SCHEMA, SCHEMA_VERSION, load_profile, save_profile

    path = Path(run_dir) / PROFILE_FILE
    if resume and path.is_file():
        prof = load_profile(path)
    else:
        modes = default_group_modes(strategy, level)
        # the analysis stops early enough (half the timeout; spawning and profiling take the rest)
        # that a slow model still gets its profile and the groups analysed so far
        # a short budget goes to the baseline and candidates: a profile that would be cut off is skipped
        outcome = (run_isolated(profile_for_search, workload, device=device, modes=modes, tolerance=tolerance,
                                time_limit_s=timeout * 0.5, timeout=timeout, log_path=str(Path(run_dir) / "profile.log"))
                   if timeout >= MIN_PROFILE_S else None)
        if outcome is not None and outcome.ok:
            prof = outcome.value
        else:
            why = outcome.reason() if outcome is not None else f"skipped: {timeout:.0f} s of the budget for it"
            prof = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device": device, "modules": [],
                    "groups": [], "sensitivity": [], "search_groups": [],
                    "unavailable": [f"the profile ({why}); per-layer precision not searched"]}
        if not modes:
            prof["unavailable"].append(f"per-layer precision (level {level} or the strategy allows no lowered mode)")
        save_profile(prof, path)
    groups = prof.get("search_groups") or []
    # strategy entries pin every group to fp32, so the baseline and global-mode starts stay what they say;
    # the diagnosis orders the strategy's starting points (autotiacc.profiling.diagnosis.order_seeds)
    return {"precision_groups": groups, "precision_enqueue": enqueue_params(groups, prof.get("sensitivity") or []),
            "precision_fp32": {param_name(g["path"]): "fp32" for g in groups}, "diagnosis": prof.get("diagnosis")}


def plan_summary(run_dir) -> list[dict[str, Any]]:
    """What a plan records about the groups: share, allowed modes, why others were excluded."""
    from ..profile import load_profile

    try:
        prof = load_profile(run_dir)
    except Exception:  # noqa: BLE001 - no profile, nothing to summarise
        return []
    return [{"path": g["path"], "inclusive_share": g.get("inclusive_share"), "allowed": g.get("allowed", []),
             "excluded": {m: s.get("reason", "") for m, s in g.get("sensitivity", {}).items() if not s.get("ok")}}
            for g in prof.get("sensitivity") or []]


def best_full_precision(top: list, trials: list) -> list:
    """The fastest measured trial that lowers nothing (global fp32, no groups), when `top`
    lacks one: re-measured beside the others at the end, so a plan that lowers layers is
    chosen only if it beats the best all-fp32 configuration side by side."""
    def full(t) -> bool:  # the trial's precision, and that of each shape bucket with its own
        values = t.user_attrs.get("knobs") or {}
        buckets = (values.get("shapes") or {}).get("knobs") or []
        precs = [values.get("precision", {})] + [k.get("precision", {}) for k in buckets]
        return all(p.get("mode", "fp32") == "fp32" and not p.get("groups") for p in precs)

    if not top or any(full(t) for t in top):
        return []
    ok = [t for t in trials if t.user_attrs.get("status") == "ok" and t.value is not None and full(t)
          and not t.user_attrs.get("baseline")]
    return [min(ok, key=lambda t: t.value)] if ok else []
