"""The one timing harness: warm-up until stable, device sync, robust statistics, interleaved A/B.

Every latency figure autotiacc reports comes from here. Candidates compared with each other
are timed *interleaved* in one process (round-robin blocks), because on shared machines the
absolute speed drifts by tens of percent within minutes; only side-by-side ratios hold.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .device import is_cuda

Runner = Callable[[], Any]


@dataclass
class Timing:
    """Latency samples (milliseconds) of one callable and their summary."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def _q(self, q: float) -> float:
        s = sorted(self.samples_ms)
        if not s:
            return math.nan
        pos = (len(s) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return self._q(0.5)

    @property
    def p90(self) -> float:
        return self._q(0.9)

    @property
    def p99(self) -> float:
        return self._q(0.99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else math.nan

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples_ms) if self.n > 1 else 0.0

    @property
    def iqr_rel(self) -> float:
        """Inter-quartile range relative to the median: the robust spread we report."""
        med = self.median
        return (self._q(0.75) - self._q(0.25)) / med if med else math.nan

    def summary(self) -> dict[str, float]:
        return {
            "median_ms": self.median, "p90_ms": self.p90, "p99_ms": self.p99,
            "mean_ms": self.mean, "stdev_ms": self.stdev, "spread": self.iqr_rel, "n": self.n,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "samples_ms": [round(x, 5) for x in self.samples_ms]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timing":
        return cls(samples_ms=[float(x) for x in d.get("samples_ms", [])])


def time_once(fn: Runner, device: str) -> float:
    """Wall time of one call in ms, bracketed by device syncs (CUDA events on GPU)."""
    if is_cuda(device):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def warm_up(fn: Runner, device: str = "cpu", *, max_s: float = 5.0, min_iters: int = 3,
            tol: float = 0.05) -> int:
    """Call `fn` until two consecutive windows of 3 calls agree within `tol` (or `max_s`).

    Returns the number of warm-up calls made. The first calls of a compiled model include
    compilation and autotuning; they must never be counted as latency.
    """
    deadline = time.perf_counter() + max_s
    times: list[float] = []
    while True:
        times.append(time_once(fn, device))
        if len(times) >= max(min_iters, 6):
            prev, last = statistics.median(times[-6:-3]), statistics.median(times[-3:])
            if abs(last - prev) <= tol * max(prev, 1e-9):
                break
        if time.perf_counter() > deadline and len(times) >= min_iters:
            break
    return len(times)


def measure(fn: Runner, device: str = "cpu", *, min_reps: int = 10, max_reps: int = 1000,
            target_s: float = 1.0, warmup_s: float = 5.0) -> Timing:
    """Warm up, then time `fn` until `target_s` has passed (at least `min_reps` samples)."""
    return measure_interleaved({"x": fn}, device, min_rounds=min_reps, max_rounds=max_reps,
                               target_s=target_s, warmup_s=warmup_s)["x"]


def measure_interleaved(fns: dict[str, Runner], device: str = "cpu", *, min_rounds: int = 10,
                        max_rounds: int = 1000, target_s: float = 2.0, warmup_s: float = 5.0,
                        block: int = 1) -> dict[str, Timing]:
    """Time several callables round-robin (A B C A B C ...) so drift hits all alike.

    The order rotates every round so no callable always runs right after another one.
    `target_s` is the total measuring time over all callables after warm-up.
    """
    names = list(fns)
    for name in names:
        warm_up(fns[name], device, max_s=warmup_s)
    out = {name: Timing() for name in names}
    t_end = time.perf_counter() + target_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < t_end):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(block):
                out[name].samples_ms.append(time_once(fns[name], device))
        rounds += 1
    return out


def faster_beyond_noise(candidate: Timing, baseline: Timing, *, min_gain: float = 0.02,
                        alpha: float = 0.05) -> bool:
    """True when `candidate` is faster than `baseline` by at least `min_gain` (relative median)
    and a one-sided Mann-Whitney U test says the difference is not noise at level `alpha`."""
    if candidate.n < 3 or baseline.n < 3:
        return False
    if candidate.median > baseline.median * (1 - min_gain):
        return False
    return mann_whitney_p_less(candidate.samples_ms, baseline.samples_ms) < alpha


def mann_whitney_p_less(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p-value that samples `a` are stochastically smaller than `b`
    (Mann-Whitney U, scipy: exact for small tie-free samples, tie-corrected otherwise)."""
    import warnings

    with warnings.catch_warnings():  # importing scipy installs warning filters: the caller's stay theirs
        from scipy.stats import mannwhitneyu
    if not a or not b:
        return 1.0
    return float(mannwhitneyu(a, b, alternative="less").pvalue)
