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

What a variant's process builds and what one window times is a *bench*: `OneShape` (the
workload's example inputs, one window = calls for `window_s`) or a traffic mix
(`inference.traffic_eval.TrafficBench`, one window = whole rounds of the mix, each round one
traffic-weighted figure). The alternation, the baseline's processes and the statistics are
the same for both, here.

`fresh=True` starts a new process for every window (what `verify` and the fidelity experiment
use: nothing survives from one window to the next); `fresh=False` keeps one warm process per
variant, built once (what a tune can afford at its end).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from .workers import Outcome, WorkerPool, run_isolated

# Environment variables that change how fast the same model runs; a plan records them as
# they were when it was measured, and `apply` warns when the production process differs.
SPEED_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
             "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")  # glibc malloc: experiments/allocator.py
BASELINE = "baseline"
BASELINE_PROCESSES = 5  # an odd process cannot set the baseline's median of windows alone; see measure_alternating
FINAL_WINDOW_S = 0.3  # one window of the tune's final
MIN_ROUNDS = 4  # the fewest windows per variant: with 3 vs 3, Mann-Whitney U cannot reach p < 0.05
MIN_BUILD_S = 10.0  # the least time a variant's build and warm-up get, whatever the deadline
FINAL_ROUNDS = 5  # the fewest windows per variant a final re-measurement aims for


def measured_env() -> dict[str, str | None]:
    """The speed-relevant environment of this process (None: unset), which workers inherit unchanged."""
    return {k: os.environ.get(k) for k in SPEED_ENV}


@dataclass
class AlternatingResult:
    """Per-variant window figures (ms) and the comparison of each variant with the baseline."""

    windows: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)  # what each variant's build reported (accuracy, build_s, ...)
    pids: dict[str, list[int]] = field(default_factory=dict)  # the process that took each window
    # the per-call samples each window's figure was made of, by part (a traffic mix: by shape)
    parts: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    timed_s: dict[str, float] = field(default_factory=dict)  # seconds each variant's windows took
    failures: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    window: str = ""  # what one window times (the bench's `describe`)
    phases: dict[str, float] = field(default_factory=dict)  # seconds in builds, warm-ups, rounds

    def median_ms(self, name: str) -> float:
        return statistics.median(self.windows[name])

    def speedup(self, name: str) -> float:
        return self.median_ms(BASELINE) / self.median_ms(name)

    def p_faster(self, name: str) -> float:
        """One-sided Mann-Whitney U p-value that `name`'s windows are faster than the baseline's."""
        from ..measure import mann_whitney_p_less

        return mann_whitney_p_less(self.windows[name], self.windows[BASELINE])

    def speedup_range(self, name: str) -> tuple[float, float]:
        """The lowest and highest speed-up of any pair of windows taken in the same round: the noise."""
        pairs = [b / c for b, c in zip(self.windows[BASELINE], self.windows[name])]
        return min(pairs), max(pairs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "alternating processes", "window": self.window, "rounds": self.rounds,
                               "seconds": round(self.seconds, 1),
                               "phases_s": {k: round(v, 1) for k, v in self.phases.items()}, "windows_ms": self.windows,
                               "window_pids": self.pids}
        if self.failures:
            out["failures"] = self.failures
        if BASELINE in self.windows:
            out["speedup"] = {n: self.speedup(n) for n in self.windows if n != BASELINE}
            out["p_faster"] = {n: self.p_faster(n) for n in self.windows if n != BASELINE}
            out["speedup_range"] = {n: list(self.speedup_range(n)) for n in self.windows if n != BASELINE}
        return out


# -- what runs in a variant's process ------------------------------------------------------------
class Bench:
    """What a variant's process builds and what one window times.

    Called in this order: in each variant's process, `build` once, then `window` for each of its
    windows; in the parent, `figures` for each candidate still standing, then `summary` once. A
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

    def figures(self, result: AlternatingResult, name: str) -> dict[str, Any]:
        """Fields a candidate's result adds beyond its timing and speed-up (a `status` and `reason` reject it)."""
        return {}

    def summary(self, result: AlternatingResult) -> dict[str, Any]:
        """Fields the whole result adds."""
        return {}


@dataclass(frozen=True)
class OneShape(Bench):
    """One input shape, the workload's example inputs; a window is calls for `window_s` (at
    least 5), its figure their median."""

    describe = "calls at one input shape"  # not a field: the repr stays "OneShape()"

    def build(self, workload, values: dict | None, *, device: str, tolerance: float) -> tuple[Any, dict[str, Any]]:
        import torch

        from ..inference.evaluate import build_candidate, build_report, reference_for

        ref = reference_for(workload, device)
        if values is None:
            return ref.baseline, {}
        from ..inference.accuracy import compare_outputs

        torch._dynamo.reset()
        cand = build_candidate(ref, values)
        acc = compare_outputs([cand(*x) for x, _ in ref.test], ref.refs, tolerance=tolerance,
                              metric=workload.metric, targets=[y for _, y in ref.test])
        if not acc.ok:
            raise ValueError(f"accuracy: {acc.reason}")
        # the int8 scales it was built with go into the plan, which replays them (`Plan.engine_records`)
        records = {k: r["record"] for k, r in cand.notes.items() if isinstance(r, dict) and "record" in r}
        return (lambda: cand(*ref.inputs)), {"build_s": cand.build_seconds, "accuracy": acc.to_dict(),
                                             **build_report(cand), "engine_records": records}

    def window(self, runner: Any, *, device: str, window_s: float) -> dict[str, Any]:
        from ..measure import measure

        return {"samples_ms": measure(runner, device, min_reps=5, target_s=window_s, warmup_s=0).samples_ms}


_BUILT: dict[tuple, Any] = {}  # (workload token, variant, device, bench) -> [runner, warm], in a variant process


def time_window(workload, name: str, values: dict | None, *, device: str, window_s: float, warmup_s: float,
                tolerance: float, build_only: bool = False, bench: Bench | None = None) -> dict[str, Any]:
    """Build `values` (None: the eager fp32 baseline) with `bench` (default `OneShape`) once in
    this process, warm it up once, then time one window of `window_s` (none when 0).
    `build_only`: build (and check accuracy) now, warm up at the next call: the parent overlaps
    builds but never warm-ups.

    Returns {"samples_ms", "pid", "window_s" (its duration), the window's "parts" if any, plus
    what the build reported ("accuracy", "build_s", ...) when this call built the variant}.
    """
    from ..measure import warm_up

    bench = bench or OneShape()
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
    timed = bench.window(runner, device=device, window_s=window_s) if window_s else {"samples_ms": []}
    return {**timed, "pid": os.getpid(), "window_s": time.perf_counter() - t0, **info}


# -- the parent's side ---------------------------------------------------------------------------
def measure_alternating(workload, variants: dict[str, dict | None], *, device: str = "cpu", rounds: int = 6,
                        window_s: float = 0.5, warmup_s: float = 1.0, tolerance: float = 2e-2,
                        fresh: bool = False, timeout_s: float = 300.0, env: dict[str, str] | None = None,
                        deadline: float | None = None, build_parallel: int | None = None,
                        target_s: float | None = None, bench: Bench | None = None) -> AlternatingResult:
    """Time each variant ({name: knob values}, plus the baseline, added as "baseline") alone in
    its own process, one window per variant per round, the order rotating every round. `bench`
    (default `OneShape`) builds a variant and times a window: see the module doc.

    With `fresh=False` every variant's process builds its variant before the first round
    (`build_parallel` builds at a time: by default all of them on CUDA, one at a time on the
    CPU, whose cores the builds' forward passes fight over), then warms up alone, so no process
    starts or compiles while another is timed. A
    variant that fails (build, accuracy, crash) is dropped with its reason in `failures`.
    Stops after `rounds`; earlier once `MIN_ROUNDS` are in and the next round would end past
    `deadline` (time.monotonic(); judged by the last round's duration), or once `FINAL_ROUNDS`
    are in and each variant's windows took `target_s` (windows longer than `window_s`, e.g.
    whole rounds of a slow traffic mix, then cost no more in all than short ones).
    The baseline gets fresh processes too, never a tune's trial worker, and
    `BASELINE_PROCESSES` of them (fewer with fewer rounds) taking its windows in turn: how fast
    eager runs depends on the process's allocation history (glibc's dynamic mmap threshold;
    convnet bs 8 faulted in 10,576 pages per call fresh, 2,885 after a bf16 candidate had run
    in the process), and even fresh processes differ: one tune's final timed eager at 21-25 ms
    in its one baseline process, the next at 33-38 ms, with the candidates the same in both
    (the first plan's 2.68x re-measured at 3.66x); a later one, with three baseline processes,
    at 25.0 ms in one and 30.4-32.3 ms in the other two. Five processes (one per round of a
    short final) cost two builds of eager, about a second; no count helps when the machine runs
    eager slow for a while (another final: 38.0-40.6 ms in all three, eager in fresh processes
    afterwards 27-29 ms, its plan over-stated by a third). A candidate's one process is a draw
    too (convnet's TorchScript bf16 plan: 9.4-10.5 ms in most processes, 12.0-13.0 ms in 4 of
    16): its figure then under-states it.
    """
    t0 = time.perf_counter()
    bench = bench or OneShape()
    variants = {BASELINE: None, **{n: v for n, v in variants.items() if n != BASELINE}}
    result = AlternatingResult(windows={n: [] for n in variants}, samples={n: [] for n in variants},
                               window=bench.describe)
    baseline_processes = min(BASELINE_PROCESSES, rounds)  # each takes a window
    pools = {} if fresh else {n: [WorkerPool(env=env) for _ in range(baseline_processes if n == BASELINE else 1)]
                              for n in variants}
    kwargs = {"device": device, "warmup_s": warmup_s, "tolerance": tolerance, "bench": bench}
    if build_parallel is None:
        build_parallel = sum(map(len, pools.values())) if device.startswith("cuda") else 1
    try:
        _start(pools, result, workload, variants, kwargs, timeout_s=timeout_s, parallel=build_parallel,
               deadline=deadline)
        t_rounds = time.perf_counter()
        round_s = 0.0
        for r in range(rounds):
            if BASELINE in result.failures or (r >= MIN_ROUNDS and (
                    (deadline is not None and time.monotonic() + round_s > deadline)
                    or (target_s is not None and r >= FINAL_ROUNDS
                        and min(result.timed_s.get(n, 0.0) for n in variants if n not in result.failures)
                        >= target_s))):
                break
            t_round = time.monotonic()
            names = [n for n in variants if n not in result.failures]
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if fresh:
                    out = run_isolated(time_window, workload, name, variants[name], timeout=timeout_s, env=env,
                                       window_s=window_s, **kwargs)
                else:  # the baseline's windows come from its processes in turn
                    out = pools[name][r % len(pools[name])].call(time_window, workload, name, variants[name],
                                                                 timeout=timeout_s, window_s=window_s, **kwargs)
                _record(result, name, out)
            result.rounds = r + 1
            round_s = time.monotonic() - t_round
        result.phases["rounds"] = time.perf_counter() - t_rounds
    finally:
        for group in pools.values():
            for pool in group:
                pool.close()
    for name in result.failures:
        for per_variant in (result.windows, result.samples, result.parts):
            per_variant.pop(name, None)
    result.seconds = time.perf_counter() - t0
    return result


def _start(pools: dict[str, list[WorkerPool]], result: AlternatingResult, workload, variants: dict[str, dict | None],
           kwargs: dict[str, Any], *, timeout_s: float, parallel: int, deadline: float | None = None) -> None:
    """Build every variant in its processes, `parallel` builds at a time, then warm each process
    up alone. Overlapping builds pays (much of a compile is single-threaded Python) up to a
    point: six processes building and warming up at once on two cores took 23 s where one after
    another took 13 s, since every forward pass of each spins its OpenMP threads against the
    others'. Warm-ups never overlap: each settles on the timing it will be measured at.
    A baseline process that fails to build takes no windows and ends at once. With `deadline`,
    a build still running when it has passed (but never before MIN_BUILD_S) fails by timeout:
    one slow rebuild does not take the others' windows."""

    def timeout() -> float:
        return timeout_s if deadline is None else max(MIN_BUILD_S, min(timeout_s, deadline - time.monotonic()))

    jobs = [(name, pool) for name, group in pools.items() for pool in group]
    outs: dict[WorkerPool, Outcome] = {}
    t0 = time.perf_counter()
    for i in range(0, len(jobs), max(1, parallel)):
        batch = jobs[i:i + max(1, parallel)]
        pending = [pool.submit(time_window, workload, name, variants[name], window_s=0, build_only=True, **kwargs)
                   for name, pool in batch]
        for (name, pool), p in zip(batch, pending):
            outs[pool] = pool.collect(p, timeout=timeout())
    t1 = time.perf_counter()
    result.phases["builds"] = t1 - t0
    for name, pool in jobs:
        if outs[pool].ok:
            outs[pool] = _merge(outs[pool], pool.call(time_window, workload, name, variants[name],
                                                              window_s=0, timeout=timeout(), **kwargs))
    result.phases["warm_ups"] = time.perf_counter() - t1
    for name, group in pools.items():
        kept = [pool for pool in group if outs[pool].ok] or group[:1]
        for pool in group:
            if pool not in kept:
                pool.close()
        pools[name] = kept
        _record(result, name, next((outs[p] for p in group if outs[p].ok), outs[group[0]]))


def _merge(built: Outcome, warmed: Outcome) -> Outcome:
    """The warm-up's outcome, carrying the build's figures (build time, accuracy)."""
    if warmed.ok:
        warmed.value = {**built.value, **warmed.value}
    return warmed


def _record(result: AlternatingResult, name: str, out: Outcome) -> None:
    if not out.ok:
        result.failures[name] = out.reason()
        return
    value = dict(out.value)
    samples, pid, parts = value.pop("samples_ms"), value.pop("pid", None), value.pop("parts", None) or {}
    timed_s = value.pop("window_s", 0.0)
    if samples:
        result.timed_s[name] = result.timed_s.get(name, 0.0) + timed_s
        result.samples[name] += samples
        result.windows[name].append(statistics.median(samples))
        result.pids.setdefault(name, []).append(pid)
        for part, xs in parts.items():
            result.parts.setdefault(name, {}).setdefault(part, []).extend(xs)
    if value:  # what the build reported
        result.info.setdefault(name, {}).update(value)


def final_rounds(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S) -> int:
    """Rounds of the final: `target_s` of windows in all, at least `FINAL_ROUNDS`."""
    return max(FINAL_ROUNDS, math.ceil(target_s / (window_s * (n_candidates + 1))))


def final_rounds_s(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S) -> float:
    """Seconds the final's rounds take: each window, plus ~20 % for the call and the switch."""
    return final_rounds(n_candidates, target_s, window_s) * (n_candidates + 1) * window_s * 1.2


def evaluate_alternating(workload, candidates: dict[str, dict], *, device: str = "cpu", tolerance: float = 2e-2,
                         target_s: float = 6.0, window_s: float = FINAL_WINDOW_S, warmup_s: float = 2.0,
                         env: dict[str, str] | None = None, timeout: float = 300.0,
                         bench: Bench | None = None) -> Outcome:
    """The final re-measurement of a tune: `candidates` and the baseline, each in its own process
    (`measure_alternating`, with `bench`: one shape by default, or a traffic mix), in `evaluate`'s
    result format plus the bench's figures; a candidate is `faster` when its windows beat the
    baseline's beyond noise (Mann-Whitney U, 5 %) by 2 % or more. Ends within `timeout`."""
    bench = bench or OneShape()
    deadline = time.monotonic() + timeout - 1.0  # a margin for closing the processes
    rounds = final_rounds(len(candidates), target_s, window_s)
    res = measure_alternating(workload, candidates, device=device, rounds=rounds, window_s=window_s,
                              warmup_s=warmup_s, tolerance=tolerance, env=env, timeout_s=timeout,
                              deadline=deadline, target_s=target_s / (len(candidates) + 1), bench=bench)
    if BASELINE in res.failures or res.rounds < MIN_ROUNDS:
        return Outcome("exception", error=res.failures.get(BASELINE, f"only {res.rounds} rounds in time"),
                       seconds=res.seconds)
    from ..measure import Timing

    out: dict[str, Any] = {}
    for name, values in candidates.items():
        r: dict[str, Any] = {"knobs": values, **res.info.get(name, {})}
        if name in res.failures:
            r.update(status="failed", reason=res.failures[name])
        else:
            ratio = 1 / res.speedup(name)
            r.update(status="ok", ratio=ratio, speedup=1 / ratio, p_faster=res.p_faster(name),
                     faster=ratio < 0.98 and res.p_faster(name) < 0.05, timing=Timing(res.samples[name]).to_dict())
            r.update(bench.figures(res, name))  # may reject it (a traffic mix: p99 over the budget)
        out[name] = r
    return Outcome("ok", value={"baseline": Timing(res.samples[BASELINE]).to_dict(), "candidates": out,
                                "alternating": res.to_dict(), **bench.summary(res)}, seconds=res.seconds)
