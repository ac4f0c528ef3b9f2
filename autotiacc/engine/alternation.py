"""The parent's side of an alternating measurement (`fidelity.measure_alternating`): the
variants' processes, each step's limit (`engine.limits`), the deadline, the allowance for
retaking busy windows, and the result (`AlternatingResult`) with each variant's verdict.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from ..machine_load import merge_loads, reliability
from . import limits
from .bench import Bench, time_window
from .status import CallStatus
from .workers import Outcome, WorkerPool, run_isolated

BASELINE = "baseline"
BASELINE_PROCESSES = 5  # an odd process cannot set the baseline's median of windows alone; see fidelity.measure_alternating
FINAL_WINDOW_S = 0.3  # one window of the tune's final
MIN_ROUNDS = 4  # the fewest windows per variant: with 3 vs 3, Mann-Whitney U cannot reach p < 0.05
BUSY_WAIT_SHARE = 0.25  # of the rounds' expected time: the most a run spends waiting out busy windows
FINAL_ROUNDS = 5  # the fewest windows per variant a final re-measurement aims for


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
    loads: dict[str, list[dict]] = field(default_factory=dict)  # the machine's load around each window
    cut: str = ""  # what the deadline cut, in words ("" when nothing)

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

    def load(self, *names: str) -> dict[str, Any] | None:
        """The load summary (`machine_load.merge_loads`) of the windows of `names`."""
        return merge_loads([x for n in names for x in self.loads.get(n, [])])

    def verdict(self, name: str) -> dict[str, Any]:
        """Whether `name`'s speed-up can be trusted (`machine_load.reliability`): the load over its
        and the baseline's windows, and the span of its rounds."""
        span = self.speedup_range(name) if self.windows.get(name) and self.windows.get(BASELINE) else None
        return reliability(self.load(BASELINE, name), span)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "alternating processes", "window": self.window, "rounds": self.rounds,
                               "seconds": round(self.seconds, 1),
                               "phases_s": {k: round(v, 1) for k, v in self.phases.items()}, "windows_ms": self.windows,
                               "window_pids": self.pids, "load": {n: self.load(n) for n in self.windows}}
        if self.failures:
            out["failures"] = self.failures
        if self.cut:
            out["cut"] = self.cut
        if BASELINE in self.windows:
            out["speedup"] = {n: self.speedup(n) for n in self.windows if n != BASELINE}
            out["p_faster"] = {n: self.p_faster(n) for n in self.windows if n != BASELINE}
            out["speedup_range"] = {n: list(self.speedup_range(n)) for n in self.windows if n != BASELINE}
            out["reliability"] = {n: self.verdict(n) for n in self.windows if n != BASELINE}
        return out


class Alternation:
    """The parent's side of one `measure_alternating`: the variants' processes, each step's
    limit (`limit`), the deadline and the allowance for retaking busy windows."""

    def __init__(self, workload, variants: dict[str, dict | None], result: AlternatingResult, *, bench: Bench,
                 device: str, window_s: float, warmup_s: float, tolerance: float, timeout_s: float,
                 env: dict[str, str] | None, deadline: float | None, costs: dict[str, limits.Cost] | None,
                 busy_wait_s: float, processes: int, rounds: int) -> None:
        self.workload, self.variants, self.result, self.env = workload, variants, result, env
        self.window_s, self.warmup_s, self.timeout_s, self.deadline = window_s, warmup_s, timeout_s, deadline
        self.costs, self.busy_wait_s = costs, busy_wait_s
        self.kwargs: dict[str, Any] = {"device": device, "tolerance": tolerance, "bench": bench}
        if processes and costs is not None:  # fewer for a model whose eager process costs more than its rounds
            processes = limits.baseline_processes(processes, limits.final_process_s(None, self.base()),
                                                  self.round_s() * rounds)
        self.pools = {n: [WorkerPool(env=env) for _ in range(processes if n == BASELINE else 1)]
                      for n in variants} if processes else {}
        self.busy_left = BUSY_WAIT_SHARE * self.round_s() * rounds if busy_wait_s else 0.0

    # -- limits -------------------------------------------------------------------------------
    def cost(self, name: str) -> limits.Cost | None:
        return None if self.costs is None or name == BASELINE else self.costs.get(name, limits.Cost())

    def base(self) -> limits.Cost:
        return (self.costs or {}).get(BASELINE, limits.Cost())

    def warmup(self, name: str) -> float:
        if self.costs is None:
            return self.warmup_s
        cost = self.cost(name) or self.base()
        return limits.warmup_s(cost.forward_s)

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def limit(self, step: str, name: str) -> float:
        """The limit on `step` (build, warm_up, window) of variant `name`: derived from its cost
        (`engine.limits`), else `timeout_s`; never past the deadline."""
        return max(0.0, min(self.own_limit(step, name), self.left()))

    def own_limit(self, step: str, name: str) -> float:
        if self.costs is None:
            return self.timeout_s
        cost, base = self.cost(name), self.base()
        forward = (cost or base).forward_s
        if step == "build":
            return limits.build_limit(cost, base)
        if step == "warm_up":
            return limits.warmup_limit(forward, base)
        return limits.window_limit(self.window_s, forward, base, busy_wait_s=self.busy_wait_s)

    def round_s(self) -> float:
        """Expected seconds of one round: a window of each variant still standing."""
        names = [n for n in self.variants if n not in self.result.failures]
        return sum(limits.window_s(self.window_s, (self.cost(n) or self.base()).forward_s) * 1.2 for n in names)

    # -- builds ---------------------------------------------------------------------------------
    def start(self, *, parallel: int) -> None:
        """Build every variant in its processes, `parallel` builds at a time, then warm each process
        up alone. Overlapping builds pays (much of a compile is single-threaded Python) up to a
        point: six processes building and warming up at once on two cores took 23 s where one after
        another took 13 s, since every forward pass of each spins its OpenMP threads against the
        others'. Warm-ups never overlap: each settles on the timing it will be measured at.

        Order: the baseline's first process, the candidates in the order given (the best first),
        then the baseline's other processes; with a deadline, a step that cannot end before it
        is not started (the best candidate is always tried), and a step past it is cut."""
        first = [(BASELINE, self.pools[BASELINE][0])]
        cands = [(n, group[0]) for n, group in self.pools.items() if n != BASELINE]
        extra = [(BASELINE, p) for p in self.pools[BASELINE][1:]]
        outs: dict[WorkerPool, Outcome] = {}
        t0 = time.perf_counter()
        for i, (name, pool) in enumerate(first + cands + extra):
            if i > 1 and not self._fits(limits.final_process_s(self.cost(name), self.base())):
                outs[pool] = _cut("rebuild it", self.left())
                continue
            pending = pool.submit(time_window, self.workload, name, self.variants[name], window_s=0,
                                  warmup_s=0, build_only=True, **self.kwargs)
            outs[pool] = pool.collect(pending, timeout=self.limit("build", name))
        t1 = time.perf_counter()
        self.result.phases["builds"] = t1 - t0
        for i, (name, pool) in enumerate(first + cands + extra):
            if outs[pool].ok and i > 1 and not self._fits(self.warmup(name)):
                outs[pool] = _cut("warm it up", self.left())
            if outs[pool].ok:
                outs[pool] = _merge(outs[pool], pool.call(
                    time_window, self.workload, name, self.variants[name], window_s=0, warmup_s=self.warmup(name),
                    timeout=self.limit("warm_up", name), **self.kwargs))
        self.result.phases["warm_ups"] = time.perf_counter() - t1
        self._keep_built(outs)

    def _fits(self, step_s: float) -> bool:
        """Whether a step of `step_s` and then the rounds a final aims for at least can still end
        before the deadline (an extra process is worth less than those rounds)."""
        return step_s + FINAL_ROUNDS * self.round_s() <= self.left()

    def _keep_built(self, outs: dict[WorkerPool, Outcome]) -> None:
        for name, group in self.pools.items():
            kept = [pool for pool in group if outs[pool].ok] or group[:1]
            for pool in group:
                if pool not in kept:
                    pool.close()
            self.pools[name] = kept
            _record(self.result, name, next((outs[p] for p in group if outs[p].ok), outs[group[0]]))

    # -- rounds ---------------------------------------------------------------------------------
    def take_rounds(self, rounds: int, *, target_s: float | None, fresh: bool) -> None:
        result = self.result
        round_s = self.round_s()
        for r in range(rounds):
            standing = [n for n in self.variants if n not in result.failures]
            if BASELINE in result.failures or (target_s is not None and r >= FINAL_ROUNDS and r >= MIN_ROUNDS
                                               and min(result.timed_s.get(n, 0.0) for n in standing) >= target_s):
                break
            if self.left() < round_s:
                result.cut = f"the deadline ended the rounds after {r} of {rounds}"
                break
            t_round = time.monotonic()
            shift = r % len(standing)
            for name in standing[shift:] + standing[:shift]:
                if not self._window(name, r, fresh=fresh):
                    result.cut = f"the deadline cut round {r + 1} of {rounds}"
                    return
            result.rounds = r + 1
            round_s = time.monotonic() - t_round

    def _window(self, name: str, r: int, *, fresh: bool) -> bool:
        """Take `name`'s window of round `r`; False when the deadline stopped it (not its failure)."""
        wait = min(self.busy_wait_s, self.busy_left)
        capped = self.left() < self.own_limit("window", name)
        kwargs: dict[str, Any] = dict(window_s=self.window_s, busy_wait_s=wait, **self.kwargs)
        if fresh:
            limit = self.timeout_s if self.costs is None else (
                self.limit("build", name) + self.limit("warm_up", name) + self.limit("window", name))
            out = run_isolated(time_window, self.workload, name, self.variants[name], timeout=min(limit, max(
                0.0, self.left())), env=self.env, warmup_s=self.warmup(name), **kwargs)
        else:  # the baseline's windows come from its processes in turn
            group = self.pools[name]
            out = group[r % len(group)].call(time_window, self.workload, name, self.variants[name],
                                             timeout=self.limit("window", name), warmup_s=0, **kwargs)
        if out.status == "timeout" and capped:
            return False
        if out.ok:
            self.busy_left -= float(((out.value or {}).get("load") or {}).get("retake_s") or 0.0)
        _record(self.result, name, out)
        return True

    def close(self) -> None:
        for group in self.pools.values():
            for pool in group:
                pool.close()


def _cut(what: str, left_s: float) -> Outcome:
    return Outcome(CallStatus.TIMEOUT, error=f"cut by the budget: no time left to {what} ({max(0.0, left_s):.0f} s left)")


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
    timed_s, load = value.pop("window_s", 0.0), value.pop("load", None)
    if samples:
        result.timed_s[name] = result.timed_s.get(name, 0.0) + timed_s
        result.samples[name] += samples
        result.windows[name].append(statistics.median(samples))
        result.pids.setdefault(name, []).append(pid)
        result.loads.setdefault(name, []).append(load)
        for part, xs in parts.items():
            result.parts.setdefault(name, {}).setdefault(part, []).extend(xs)
    if value:  # what the build reported
        result.info.setdefault(name, {}).update(value)
