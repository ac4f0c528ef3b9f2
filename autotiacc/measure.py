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


class TooSlow(Exception):
    """Two calls in a row were slower than the caller's limit: timing it any further is waste.

    `value` is the last call's figure, in the unit of the limit (ms, or a ratio to a baseline)."""

    def __init__(self, value: float, limit: float) -> None:
        super().__init__(f"two calls in a row at {value:.4g}, over the limit {limit:.4g}")
        self.value, self.limit = value, limit


def check_pace(values: Sequence[float], limit: float | None) -> None:
    """Raise TooSlow when the last two of `values` are both over `limit` (one slow call may be
    a recompile, a CUDA-graph capture or a page fault; two in a row are the candidate's pace)."""
    if limit is not None and len(values) >= 2 and values[-1] > limit and values[-2] > limit:
        raise TooSlow(values[-1], limit)


def warm_up(fn: Runner, device: str = "cpu", *, max_s: float = 5.0, min_iters: int = 3,
            tol: float = 0.05, give_up_ms: float | None = None) -> int:
    """Call `fn` until two consecutive windows of 3 calls agree within `tol` (or `max_s`).

    Returns the number of warm-up calls made. The first calls of a compiled model include
    compilation and autotuning; they must never be counted as latency. With `give_up_ms`,
    raises TooSlow as soon as two calls in a row take longer than that.
    """
    deadline = time.perf_counter() + max_s
    times: list[float] = []
    if min_iters <= 0 and max_s <= 0:
        return 0
    while True:
        times.append(time_once(fn, device))
        check_pace(times, give_up_ms)
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
                        block: int = 1, settle: float | None = None, reference: str | None = None,
                        initial: dict[str, Timing] | None = None, min_warmup: int = 3) -> dict[str, Timing]:
    """Time several callables round-robin (A B C A B C ...) so drift hits all alike.

    The order rotates every round so no callable always runs right after another one.
    `target_s` is the total measuring time over all callables after warm-up. With `settle`
    and `reference`, stops earlier, once every other callable's ratio to the reference is known
    within +-`settle` (relative half-width of a 95 % interval of the median per-round ratio):
    more rounds would not change a ranking that precise. `initial` samples (a quick look taken
    the same way) count towards the rounds and the interval. `min_warmup`: the fewest warm-up
    calls of each callable (0 with `warmup_s=0`: none, for callables that have just run).
    """
    names = list(fns)
    for name in names:
        warm_up(fns[name], device, max_s=warmup_s, min_iters=min_warmup)
    out = {name: Timing(list(initial[name].samples_ms) if initial else []) for name in names}
    have = min(t.n for t in out.values()) // block
    t_end = time.perf_counter() + target_s
    rounds = 0
    while rounds < max_rounds and (have + rounds < min_rounds or time.perf_counter() < t_end):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(block):
                out[name].samples_ms.append(time_once(fns[name], device))
        rounds += 1
        if settle is not None and have + rounds >= min_rounds and rounds % 4 == 0 and _settled(out, reference, settle):
            break
    return out


def median_ratio_interval(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(low, median, high) of the paired ratios a[i] / b[i]: a distribution-free interval for
    their median from order statistics (normal approximation of the binomial ranks)."""
    r = sorted(x / y for x, y in zip(a, b) if y > 0)
    n = len(r)
    if n == 0:
        return math.nan, math.nan, math.nan
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return r[lo], statistics.median(r), r[hi]


def _settled(out: dict[str, Timing], reference: str | None, settle: float) -> bool:
    if reference is None or reference not in out:
        return False
    for name, t in out.items():
        if name == reference:
            continue
        lo, med, hi = median_ratio_interval(t.samples_ms, out[reference].samples_ms)
        if not med > 0 or (hi - lo) / (2 * med) > settle:
            return False
    return True


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
