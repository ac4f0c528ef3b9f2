"""Figures that hold in production: each variant timed alone in its own process, in the
environment of the command, alternating A B A B ... so drift hits all variants alike.

Interleaving two variants in one process is fair when they share one thread pool (eager and
TorchScript or inductor all use torch's OpenMP threads). It is not when they do not: torch's
OpenMP threads spin after each op while ONNX Runtime's pool wants the same cores (one
fp16-overflow MLP measured 1.21x interleaved, 1.55x alone). Forcing `OMP_WAIT_POLICY=PASSIVE`
makes interleaving fair but slows the eager baseline (0.99 ms against 0.60 ms here), so the
speed-up would be measured against a baseline no user runs. Hence `measure_alternating`:
every variant in a process of its own, measured in windows taken in turns; the speed-up is
the ratio of the medians of the per-window medians, and the noise test is a one-sided
Mann-Whitney U over those window medians (the repetitions), not over correlated samples.

What a variant's process builds and what one window times is a *bench* (`engine.bench`): the
workload's `default_bench()` (`inference.one_shape.OneShape`: its example inputs, one window =
calls for `window_s`) or a traffic mix (`inference.shapes.traffic_eval.TrafficBench`, one window
= whole rounds of the mix, each round one traffic-weighted figure). The alternation, the
baseline's processes and the statistics are the same for both, here.

`fresh=True` starts a new process for every window (the fidelity experiment: nothing survives
from one window to the next); `fresh=False` keeps one warm process per variant, built once
(what a tune's final and `verify` can afford).

Every window is taken with the machine's load sampled around it (`machine_load`); a busy window
is taken again once, after a bounded wait for the machine to go quiet, while the run's allowance
for that lasts. What stays busy is counted per variant, and a comparison whose windows were
busy beyond `machine_load.BUSY_WINDOWS_SHARE`, or whose rounds span more than
`machine_load.ROUNDS_SPAN`, is marked not reliable (`AlternatingResult.verdict`).

Each step (a build, a warm-up, a window) has a limit derived from the variant's measured cost
(`engine.limits`, given as `costs`), and nothing starts or runs past the `deadline`: what does not
fit is cut, in this order: the baseline's extra processes, the lower-ranked candidates, rounds.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from . import limits
from .alternation import (BASELINE, BASELINE_PROCESSES, FINAL_ROUNDS, FINAL_WINDOW_S, MIN_ROUNDS, AlternatingResult,
                          Alternation)
from .bench import Bench, time_window
from .status import CallStatus
from .workers import Outcome

__all__ = ["AlternatingResult", "BASELINE", "BASELINE_PROCESSES", "Bench", "FINAL_ROUNDS", "FINAL_WINDOW_S",
           "MIN_ROUNDS", "evaluate_alternating", "final_rounds", "final_rounds_s", "measure_alternating",
           "measured_env", "time_window"]

# Environment variables that change how fast the same model runs; a plan records them as
# they were when it was measured, and `apply` warns when the production process differs.
SPEED_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
             "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")  # glibc malloc: experiments/allocator.py
FINAL_BUSY_WAIT_S = 1.0  # the most one window of a final waits for a busy machine to go quiet
CLOSE_S = 1.0  # kept at the end of a final for closing its processes


def measured_env() -> dict[str, str | None]:
    """The speed-relevant environment of this process (None: unset), which workers inherit unchanged."""
    return {k: os.environ.get(k) for k in SPEED_ENV}


def measure_alternating(workload, variants: Mapping[str, dict | None], *, device: str = "cpu", rounds: int = 6,
                        window_s: float = 0.5, warmup_s: float = 1.0, tolerance: float = 2e-2,
                        fresh: bool = False, timeout_s: float = 300.0, env: dict[str, str] | None = None,
                        deadline: float | None = None, build_parallel: int | None = None,
                        target_s: float | None = None, bench: Bench | None = None,
                        costs: dict[str, limits.Cost] | None = None, busy_wait_s: float = 0.0) -> AlternatingResult:
    """Time each variant ({name: knob values}, plus the baseline, added as "baseline") alone in
    its own process, one window per variant per round, the order rotating every round. `bench`
    (default: the workload's `default_bench()`) builds a variant and times a window: see the module doc.

    With `fresh=False` every variant's process builds its variant before the first round
    (`build_parallel` builds at a time: by default all of them on CUDA, one at a time on the
    CPU, whose cores the builds' forward passes fight over), then warms up alone, so no process
    starts or compiles while another is timed. A variant that fails (build, accuracy, crash) is
    dropped with its reason in `failures`. Stops after `rounds`; earlier once `FINAL_ROUNDS`
    are in and each variant's windows took `target_s` (windows longer than `window_s`, e.g.
    whole rounds of a slow traffic mix, then cost no more in all than short ones), or when the
    next round would end past `deadline` (time.monotonic(); judged by the last round).

    `costs` ({name: `limits.Cost`}, the baseline's under "baseline"): what each variant was
    measured to cost; each step's limit derives from it (`engine.limits`), and each process
    warms up for `limits.warmup_s` of its forward. Without, every step gets `timeout_s` and
    `warmup_s`. `busy_wait_s`: the most one window waits for a busy machine to go quiet before
    it is retaken; all windows together wait at most `BUSY_WAIT_SHARE` of the rounds' time.

    The baseline gets fresh processes too, never a tune's trial worker, and `BASELINE_PROCESSES`
    of them (fewer with fewer rounds, for a model whose eager process costs more than its rounds,
    or when the deadline leaves no time to build them) taking its windows in turn: how fast eager
    runs depends on the process's allocation history (glibc's dynamic mmap threshold; convnet
    bs 8 faulted in 10,576 pages per call fresh, 2,885 after a bf16 candidate had run in the
    process), and even fresh processes differ: one tune's final timed eager at 21-25 ms in its one
    baseline process, the next at 33-38 ms, the candidates the same in both (the first plan's
    2.68x re-measured at 3.66x). Five processes cost two builds of eager, about a second; no count
    helps when the machine runs eager slow for a while (another final: 38.0-40.6 ms in all three,
    27-29 ms in fresh processes afterwards). A candidate's one process is a draw too (convnet's
    TorchScript bf16 plan: 9.4-10.5 ms in most processes, 12.0-13.0 ms in 4 of 16).
    """
    t0 = time.perf_counter()
    bench = bench or workload.default_bench()
    variants = {BASELINE: None, **{n: v for n, v in variants.items() if n != BASELINE}}
    result = AlternatingResult(windows={n: [] for n in variants}, samples={n: [] for n in variants},
                               window=bench.describe)
    run = Alternation(workload, variants, result, bench=bench, device=device, window_s=window_s, warmup_s=warmup_s,
                       tolerance=tolerance, timeout_s=timeout_s, env=env, deadline=deadline, costs=costs,
                       busy_wait_s=busy_wait_s, processes=0 if fresh else min(BASELINE_PROCESSES, rounds),
                       rounds=rounds)
    try:
        if not fresh:
            run.start(parallel=build_parallel if build_parallel is not None
                      else (len(variants) + BASELINE_PROCESSES if device.startswith("cuda") else 1))
        t_rounds = time.perf_counter()
        run.take_rounds(rounds, target_s=target_s, fresh=fresh)
        result.phases["rounds"] = time.perf_counter() - t_rounds
    finally:
        run.close()
    for name in result.failures:
        for per_variant in (result.windows, result.samples, result.parts):
            per_variant.pop(name, None)
    result.seconds = time.perf_counter() - t0
    return result



def final_rounds(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S) -> int:
    """Rounds of the final: `target_s` of windows in all, at least `FINAL_ROUNDS`."""
    return max(FINAL_ROUNDS, math.ceil(target_s / (window_s * (n_candidates + 1))))


def final_rounds_s(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S, *,
                   forwards_s: list[float] | None = None, rounds: int | None = None) -> float:
    """Seconds the final's rounds take: each window (`limits.window_s`: `window_s`, or its fewest
    calls of each variant's forward in `forwards_s`, the baseline's included), plus ~20 % for
    the call and the switch; as many rounds as the final takes (it stops once each variant's
    windows took its share of `target_s`, `FINAL_ROUNDS` at least), or `rounds`."""
    windows = [limits.window_s(window_s, f) for f in forwards_s] if forwards_s else [window_s] * (n_candidates + 1)
    if rounds is None:
        share_met = max(FINAL_ROUNDS, math.ceil(target_s / (n_candidates + 1) / min(windows)))
        rounds = min(final_rounds(n_candidates, target_s, window_s), share_met)
    return rounds * sum(windows) * 1.2


def evaluate_alternating(workload, candidates: dict[str, dict], *, device: str = "cpu", tolerance: float = 2e-2,
                         target_s: float = 6.0, window_s: float = FINAL_WINDOW_S, warmup_s: float = 2.0,
                         env: dict[str, str] | None = None, timeout: float = 300.0, bench: Bench | None = None,
                         costs: dict[str, limits.Cost] | None = None,
                         busy_wait_s: float = FINAL_BUSY_WAIT_S) -> Outcome:
    """The final re-measurement of a tune: `candidates` (the best first) and the baseline, each
    in its own process (`measure_alternating`, with `bench`: one shape by default, or a traffic
    mix; `costs`: what each was measured to cost, see there), in `evaluate`'s result format
    plus the bench's figures; a candidate is `faster` when its windows beat the baseline's beyond
    noise (Mann-Whitney U, 5 %) by 2 % or more, and carries its `reliability` verdict. Ends
    within `timeout`: what does not fit is cut (fewer baseline processes, candidates, rounds)."""
    bench = bench or workload.default_bench()
    deadline = time.monotonic() + timeout - CLOSE_S
    rounds = final_rounds(len(candidates), target_s, window_s)
    res = measure_alternating(workload, candidates, device=device, rounds=rounds, window_s=window_s,
                              warmup_s=warmup_s, tolerance=tolerance, env=env, timeout_s=timeout,
                              deadline=deadline, target_s=target_s / (len(candidates) + 1), bench=bench,
                              costs=costs, busy_wait_s=busy_wait_s)
    if BASELINE in res.failures or res.rounds < MIN_ROUNDS:
        why = res.failures.get(BASELINE) or (f"cut by the budget after {res.rounds} rounds (it needs "
                                             f"{MIN_ROUNDS} to judge the noise)")
        return Outcome(CallStatus.EXCEPTION, error=why, seconds=res.seconds)
    from ..measure import Timing

    out: dict[str, Any] = {}
    for name, values in candidates.items():
        r: dict[str, Any] = {"knobs": values, **res.info.get(name, {})}
        if name in res.failures:
            r.update(status="failed", reason=res.failures[name])
        else:
            ratio = 1 / res.speedup(name)
            r.update(status="ok", ratio=ratio, speedup=1 / ratio, p_faster=res.p_faster(name),
                     faster=ratio < 0.98 and res.p_faster(name) < 0.05, reliability=res.verdict(name),
                     timing=Timing(res.samples[name], load=res.load(name)).to_dict())
            r.update(bench.figures(res, name))  # may reject it (a traffic mix: p99 over the budget)
        out[name] = r
    base = Timing(res.samples[BASELINE], load=res.load(BASELINE)).to_dict()
    return Outcome(CallStatus.OK, value={"baseline": base, "candidates": out, "alternating": res.to_dict(),
                                **bench.summary(res)}, seconds=res.seconds)
