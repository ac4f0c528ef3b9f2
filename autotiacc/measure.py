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
    # the machine's load while they were taken (`machine_load.LoadWindow.to_dict()`; None: not sampled)
    load: dict[str, Any] | None = None

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

    @property
    def busy(self) -> bool:
        """The machine was busy while these samples were taken (see `machine_load`)."""
        return bool(self.load and self.load.get("busy"))

    def to_dict(self) -> dict[str, Any]:
        out = {**self.summary(), "samples_ms": [round(x, 5) for x in self.samples_ms]}
        if self.load is not None:
            out["load"] = self.load
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timing":
        return cls(samples_ms=[float(x) for x in d.get("samples_ms", [])], load=d.get("load"))


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
    a CUDA-graph capture or a page fault; two in a row are the candidate's pace)."""
    if limit is not None and len(values) >= 2 and values[-1] > limit and values[-2] > limit:
        raise TooSlow(values[-1], limit)


def compile_events() -> int:
    """Frames torch.compile (dynamo) has compiled in this process so far, recompiles included;
    0 while dynamo is not loaded. A call during which it grows compiled: its time is no pace."""
    from .torch_compat import compiled_frames

    return compiled_frames()


class Pace:
    """The calls of one candidate against a limit (`check_pace`), in the unit of the limit: a
    call's ms over `scale`. A call that compiled or recompiled (`compile_events`) is never a
    slow call: it is set aside and counted in `compiling_calls`."""

    def __init__(self, limit: float | None = None) -> None:
        self.limit, self.values, self.compiling_calls = limit, [], 0

    def time(self, fn: Runner, device: str, *, scale: float = 1.0) -> float | None:
        """Time one call of `fn` (ms); None when it compiled. Raises TooSlow (see `check_pace`)."""
        before = compile_events()
        ms = time_once(fn, device)
        if compile_events() != before:
            self.compiling_calls += 1
            return None
        self.values.append(ms / scale)
        check_pace(self.values, self.limit)
        return ms


def warm_up(fn: Runner, device: str = "cpu", *, max_s: float = 5.0, min_iters: int = 3,
            tol: float = 0.05, give_up_ms: float | None = None, pace: Pace | None = None) -> int:
    """Call `fn` until two consecutive windows of 3 calls agree within `tol` (or `max_s`).

    Returns the number of warm-up calls made. The first calls of a compiled model include
    compilation and autotuning; they must never be counted as latency. With `give_up_ms` (or
    a `pace`, whose limit is in ms), raises TooSlow as soon as two calls in a row that did not
    compile take longer than that; calls that compiled count in `pace.compiling_calls`.
    """
    deadline = time.perf_counter() + max_s
    pace = pace or Pace(give_up_ms)
    times: list[float] = []
    calls = 0
    if min_iters <= 0 and max_s <= 0:
        return 0
    while True:
        ms = pace.time(fn, device)
        calls += 1
        if ms is not None:
            times.append(ms)
        if len(times) >= max(min_iters, 6):
            prev, last = statistics.median(times[-6:-3]), statistics.median(times[-3:])
            if abs(last - prev) <= tol * max(prev, 1e-9):
                break
        if time.perf_counter() > deadline and calls >= min_iters:
            break
    return calls


def measure(fn: Runner, device: str = "cpu", *, min_reps: int = 10, max_reps: int = 1000,
            target_s: float = 1.0, warmup_s: float = 5.0, min_warmup: int = 3, busy_wait_s: float = 0.0) -> Timing:
    """Warm up, then time `fn` until `target_s` has passed (at least `min_reps` samples)."""
    return measure_interleaved({"x": fn}, device, min_rounds=min_reps, max_rounds=max_reps, target_s=target_s,
                               warmup_s=warmup_s, min_warmup=min_warmup, busy_wait_s=busy_wait_s)["x"]


def measure_interleaved(fns: dict[str, Runner], device: str = "cpu", *, min_rounds: int = 10,
                        max_rounds: int = 1000, target_s: float = 2.0, warmup_s: float = 5.0,
                        block: int = 1, settle: float | None = None, reference: str | None = None,
                        initial: dict[str, Timing] | None = None, min_warmup: int = 3,
                        busy_wait_s: float = 0.0, peers: int = 1) -> dict[str, Timing]:
    """Time several callables round-robin (A B C A B C ...) so drift hits all alike.

    The order rotates every round so no callable always runs right after another one.
    `target_s` is the total measuring time over all callables after warm-up. With `settle`
    and `reference`, stops earlier, once every other callable's ratio to the reference is known
    within +-`settle` (relative half-width of a 95 % interval of the median per-round ratio):
    more rounds would not change a ranking that precise. `initial` samples (a quick look taken
    the same way) count towards the rounds and the interval. `min_warmup`: the fewest warm-up
    calls of each callable (0 with `warmup_s=0`: none, for callables that have just run).

    The machine's load is sampled around the rounds (`machine_load.LoadProbe`; `peers`: see
    there) and lands in each Timing's `load`. When it was busy and `busy_wait_s` > 0, waits up
    to that long for the machine to go quiet and, if it did, takes the rounds once more (without
    `initial`); else, or if that is busy too, the figures stand with the load marked busy.
    """
    from .machine_load import LoadProbe, wait_quiet

    names = list(fns)
    for name in names:
        warm_up(fns[name], device, max_s=warmup_s, min_iters=min_warmup)
    kwargs = dict(min_rounds=min_rounds, max_rounds=max_rounds, target_s=target_s, block=block, settle=settle,
                  reference=reference)
    with LoadProbe(peers=peers) as probe:
        out = _rounds(fns, device, initial=initial, **kwargs)
    load = probe.window.to_dict() if probe.window else None
    if load and load["busy"] and busy_wait_s > 0 and wait_quiet(busy_wait_s, peers=peers):
        with LoadProbe(peers=peers) as probe:
            out = _rounds(fns, device, initial=None, **kwargs)
        load = {**probe.window.to_dict(), "retaken": True} if probe.window else load
    for t in out.values():
        t.load = load
    return out


def _rounds(fns: dict[str, Runner], device: str, *, min_rounds: int, max_rounds: int, target_s: float, block: int,
            settle: float | None, reference: str | None, initial: dict[str, Timing] | None) -> dict[str, Timing]:
    """The timed rounds of `measure_interleaved`, after its warm-up."""
    names = list(fns)
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
