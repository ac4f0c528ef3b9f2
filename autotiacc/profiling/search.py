"""The profiling step, one entry point for `autotiacc profile` and the tune: a profile and the
sensitivity pass of its groups, in an isolated process, cut before its deadline with what it
finished (`partial`), and the groups the search samples.

`run_profile` is that entry: the caller passes the process runner (`engine.workers.run_isolated`)
and the `Checks` (inference's accuracy comparison and static int8 check), which live above this
package.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..knobs.precision_groups import LOWERED_MODES
from .schema import PARTIAL_WHY, PROGRESS_FILE, load_profile, save_profile
from .sensitivity import Checks, analyse_sensitivity

SEARCHED_GROUPS = 6  # at most this many groups get an Optuna parameter each


def run_profile(workload, run: Callable[..., Any], *, device: str, modes: list[str], tolerance: float, checks: Checks,
                timeout: float, target_s: float = 1.0, start: dict[str, Any] | None = None,
                work_dir: str | Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """Profile and sensitivity analysis in one process started by `run(fn, *args, timeout=,
    log_path=, **kwargs)`; returns (the profile or None, why it failed or was cut).

    The process stops itself before `timeout` with what it finished (a profile cut there keeps
    its analysed groups, marked `partial`). With `work_dir`, it writes its progress there after
    each step, so if it is killed at `timeout` (or crashes) after the profile itself, what it had
    written is returned, marked with why it stopped; its log goes there too. `start` (a cached
    partial profile) is completed rather than redone."""
    progress = Path(work_dir) / PROGRESS_FILE if work_dir is not None else None
    if progress is not None:
        progress.unlink(missing_ok=True)
    # its own deadline leaves the time to send the result and exit before the kill
    deadline = time.time() + timeout - min(2.0, max(0.5, 0.1 * timeout))
    outcome = run(profile_for_search, workload, device=device, modes=modes, tolerance=tolerance, checks=checks,
                  target_s=target_s, deadline=deadline, start=start, timeout=timeout,
                  progress_path=str(progress) if progress is not None else None,
                  log_path=str(Path(work_dir) / "profile.log") if work_dir is not None else None)
    if outcome.ok:
        prof, why = outcome.value, None
    else:
        why = outcome.reason()
        prof = start
        if progress is not None and progress.is_file():  # killed at its cap (or crashed) after the profile itself
            prof = load_profile(progress)
            if prof.get("partial"):
                prof["partial"] += f" (stopped: {why})"
    if progress is not None:
        progress.unlink(missing_ok=True)
    return prof, why


def profile_for_search(workload, *, device: str = "cpu", modes: list[str], tolerance: float, checks: Checks,
                       target_s: float = 1.0, time_limit_s: float | None = None, deadline: float | None = None,
                       start: dict[str, Any] | None = None, progress_path: str | None = None) -> dict[str, Any]:
    """Profile, then (when `modes`) the sensitivity analysis of the profile's groups. Runs in
    an isolated process, so it is timed in the same environment as the trials.

    `start`: a partial profile of this workload on this machine (cached by an earlier tune): its
    profile is kept and its analysis completed. The work stops before `deadline` (`time.time()`;
    or `time_limit_s` from now) with what it finished, marked `partial`. With `progress_path`
    the profile so far is written there after each step, so a process killed at its cap still
    leaves it (`run_profile` reads it back)."""
    from ..device import to_device, use_device
    from .forward import profile_workload

    if time_limit_s is not None:
        deadline = min(deadline or math.inf, time.time() + time_limit_s)
    use_device(device)
    model = to_device(workload.build_model(), device)  # one build for the profile and the analysis
    if start and start.get("modules"):
        prof = copy.deepcopy(start)
    else:
        # the profile may take all the time: without it there is nothing to keep, while the
        # analysis can be left, step by step, to later runs (its repetitions shrink with the time)
        prof = profile_workload(workload, device=device, model=model, target_s=target_s, deadline=deadline)
        prof["sensitivity"] = []
    prof.pop("partial", None)

    def progress(sens: list[dict[str, Any]]) -> None:
        if progress_path:
            save_profile(settle(prof, sens), progress_path)

    sens = prof.get("sensitivity") or []
    if modes and prof.get("groups"):
        sens = analyse_sensitivity(workload, prof["groups"], modes=modes, tolerance=tolerance, checks=checks,
                                   device=device, deadline=deadline, model=model, done=sens, progress=progress)
    return settle(prof, sens)


def settle(prof: dict[str, Any], sensitivity: list[dict[str, Any]]) -> dict[str, Any]:
    """`prof` with this analysis, the groups the search samples, and `partial` (what is left,
    for a later tune to complete) where a group still has modes to analyse."""
    out = {k: v for k, v in prof.items() if k != "partial"}
    out["sensitivity"], out["search_groups"] = sensitivity, search_groups(sensitivity)
    left = [g["path"] for g in sensitivity if g.get("skipped")]
    if left:
        out["partial"] = (f"sensitivity: {len(left)} of {len(sensitivity)} groups not fully analysed "
                          f"({', '.join(left)}); {PARTIAL_WHY}")
    return out


def search_groups(sensitivity: list[dict[str, Any]], limit: int = SEARCHED_GROUPS) -> list[dict[str, Any]]:
    """The groups the search samples: those with at least one allowed mode, best score first,
    each with its fixed choice list (fp32 first, then its allowed modes in GROUP_MODES order)."""
    picked = [g for g in sensitivity if g.get("allowed")][:limit]
    return [{"path": g["path"], "choices": ["fp32"] + [m for m in LOWERED_MODES if m in g["allowed"]]}
            for g in picked]
