"""Per-layer precision in the tune: the profiling step (`autotiacc.profiling.search.run_profile`)
with the inference task's checks, and what the precision knob's search takes from it (the groups,
their choices and starting points).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..knobs.precision_groups import LOWERED_MODES, param_name
from ..profiling.schema import PROFILE_FILE, failed_profile, load_profile, save_profile
from ..profiling.search import run_profile
from ..profiling.sensitivity import Checks
from .accuracy import compare_outputs
from .static_int8 import analysed, check_group, kept_fp32

CHECKS = Checks(compare=compare_outputs, static_int8=check_group)  # how the sensitivity pass judges a group
MIN_PROFILE_S = 5.0  # the least time a profile gets by default (a worker barely starts in less); see `min_s`


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


def default_group_modes(strategy, level: int, device: str = "cpu") -> list[str]:
    """Modes the sensitivity pass checks per group: the group modes the search may use (the
    strategy's `precision.group_modes`, else the lowered global modes it lists; per-layer int8
    too, for Linear groups), and `int8_static` where it is searched (`static_int8.analysed`);
    none at level 0."""
    if level < 1:
        return []
    space = strategy.space("precision")
    if "group_modes" in space:
        return [m for m in LOWERED_MODES if m in space["group_modes"]] + analysed(strategy, level, device)
    listed = space.get("mode", [])
    return [m for m in LOWERED_MODES if m in listed and m != "int8_dynamic"] + ["int8_dynamic"] + analysed(
        strategy, level, device)


def prepare_search(workload, run_dir, *, device: str, level: int, strategy, tolerance: float, timeout: float,
                   resume: bool = False, start: dict[str, Any] | None = None, min_s: float = MIN_PROFILE_S) -> dict:
    """The tune's profiling step (`run_profile`), written to `profile.json`; returns
    SearchContext extras for the precision knob.

    A failed profile is recorded and the tune goes on without per-layer groups. On `--resume`
    the saved profile is reused so every group keeps the same Optuna choices. Below `min_s`,
    skipped (`start`, a cached partial profile, is kept as it is)."""
    from ..engine.workers import run_isolated

    path = Path(run_dir) / PROFILE_FILE
    if resume and path.is_file():
        prof = load_profile(path)
    else:
        modes = default_group_modes(strategy, level, device)
        prof, why = start, f"skipped: {timeout:.0f} s of the budget for it, it needs about {min_s:.0f} s"
        if timeout >= min_s:  # a short budget goes to the baseline and candidates
            prof, why = run_profile(workload, run_isolated, device=device, modes=modes, tolerance=tolerance,
                                    checks=CHECKS, timeout=timeout, start=start, work_dir=run_dir)
        prof = prof if prof is not None else failed_profile(device, why or "not made")
        level_note = f"per-layer precision (level {level} or the strategy allows no lowered mode)"
        if not modes and level_note not in prof.setdefault("unavailable", []):
            prof["unavailable"].append(level_note)
        save_profile(prof, path)
    groups = prof.get("search_groups") or []
    # strategy entries pin every group to fp32, so the baseline and global-mode starts stay what they say;
    # the diagnosis orders the strategy's starting points (autotiacc.profiling.diagnosis.order_seeds)
    return {"precision_groups": groups, "precision_enqueue": enqueue_params(groups, prof.get("sensitivity") or []),
            "precision_fp32": {param_name(g["path"]): "fp32" for g in groups}, "diagnosis": prof.get("diagnosis"),
            "int8_static_fp32": kept_fp32(prof.get("sensitivity") or [])}
