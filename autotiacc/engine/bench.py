"""What runs in a variant's process of an alternating measurement (`engine.fidelity`): a
*bench* builds the variant once and times one window per call (`time_window`), with the
machine's load sampled around every window (`machine_load`).

The engine knows no bench but this interface: the task hands it one (a traffic mix's), or the
workload's `default_bench()` is used (an inference workload's: `inference.one_shape.OneShape`,
which builds the candidate, computes the reference and compares outputs).
"""
from __future__ import annotations

import os
import time
from typing import Any


class Bench:
    """What a variant's process builds and what one window times.

    Called in this order: in each variant's process, `build` once, then `window` for each of its
    windows; in the parent, `figures` for each candidate still standing, then `summary` once
    (`result`: the `fidelity.AlternatingResult`). A
    bench travels to the processes with every call: keep it small, picklable, and its repr stable
    (it keys the process's build).
    """

    describe: str = ""  # what one window times, in words (recorded with the result)

    def build(self, workload, values: dict | None, *, device: str, tolerance: float) -> tuple[Any, dict[str, Any]]:
        """The variant (None: the eager fp32 baseline) as a runner to warm up (a call runs it once)
        and to time, and what the build reports; raises when the variant fails (its accuracy included)."""
        raise NotImplementedError

    def window(self, runner: Any, *, device: str, window_s: float) -> dict[str, Any]:
        """One window: {"samples_ms": the figures whose median is the window's, "parts": optional
        {part: per-call ms} they were made of}."""
        raise NotImplementedError

    def figures(self, result: Any, name: str) -> dict[str, Any]:
        """Fields a candidate's result adds beyond its timing and speed-up (a `status` and `reason` reject it)."""
        return {}

    def summary(self, result: Any) -> dict[str, Any]:
        """Fields the whole result adds."""
        return {}


_BUILT: dict[tuple, Any] = {}  # (workload token, variant, device, bench) -> [runner, warm], in a variant process


def time_window(workload, name: str, values: dict | None, *, device: str, window_s: float, warmup_s: float,
                tolerance: float, build_only: bool = False, bench: Bench | None = None,
                busy_wait_s: float = 0.0) -> dict[str, Any]:
    """Build `values` (None: the eager fp32 baseline) with `bench` (default: the workload's) once in
    this process, warm it up once, then time one window of `window_s` (none when 0).
    `build_only`: build (and check accuracy) now, warm up at the next call: the parent overlaps
    builds but never warm-ups. A window taken while the machine was busy is taken once more
    if it goes quiet within `busy_wait_s` (no wait when 0).

    Returns {"samples_ms", "pid", "window_s" (its duration), "load" (the machine's, see
    `machine_load`; "retake_s": what the retake cost), the window's "parts" if any, plus what
    the build reported ("accuracy", "build_s", ...) when this call built the variant}.
    """
    from ..measure import warm_up

    bench = bench or workload.default_bench()
    key = (getattr(workload, "token", None), name, device, repr(bench))
    info: dict[str, Any] = {}
    if key not in _BUILT:
        _BUILT.clear()  # one variant per process
        runner, info = bench.build(workload, values, device=device, tolerance=tolerance)
        _BUILT[key] = [runner, False]
    runner, warm = _BUILT[key]
    if build_only:
        return {"samples_ms": [], "pid": os.getpid(), **info}
    if not warm:
        warm_up(runner, device, max_s=warmup_s)
        _BUILT[key][1] = True
    t0 = time.perf_counter()
    timed = _watched_window(bench, runner, device=device, window_s=window_s, busy_wait_s=busy_wait_s)
    return {**timed, "pid": os.getpid(), "window_s": time.perf_counter() - t0, **info}


def _watched_window(bench: Bench, runner: Any, *, device: str, window_s: float, busy_wait_s: float) -> dict[str, Any]:
    """`bench.window` with the load sampled around it; a busy one taken again after a quiet wait."""
    from ..machine_load import LoadProbe, wait_quiet

    if not window_s:
        return {"samples_ms": []}
    with LoadProbe() as probe:
        timed = bench.window(runner, device=device, window_s=window_s)
    load = probe.window.to_dict() if probe.window else None
    if load and load["busy"] and busy_wait_s > 0:
        t0 = time.perf_counter()
        if wait_quiet(busy_wait_s):  # it went quiet: take the window again
            with LoadProbe() as probe:
                timed = bench.window(runner, device=device, window_s=window_s)
            load = {**probe.window.to_dict(), "retaken": True} if probe.window else load
        load = {**load, "retake_s": time.perf_counter() - t0}
    return {**timed, "load": load}
