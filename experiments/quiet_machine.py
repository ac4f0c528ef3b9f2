"""Is the machine quiet enough to time on? Other processes' CPU use and the steal, measured
from the kernel's counters, before a benchmark and during each of its timed processes.

A busy machine lies: with other work beside a tune, eager windows of one final swung from 39 ms
to 544 ms (DESIGN.md). The load average alone cannot say it during a benchmark (the benchmark's
own processes load the cores), so `CpuMonitor` counts what the whole machine ran
(`psutil.cpu_times`, i.e. /proc/stat) less what this process and its descendants ran: a
process that has exited and was reaped is counted in its parent's `children_*` times, so the
benchmark's finished children stay on its side of the ledger.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

OTHERS_MAX = 0.25  # cores: other processes using more than a quarter of a core, on average, is busy
STEAL_MAX = 0.05  # share of the CPU time the hypervisor gave to other guests
LOAD_MAX = 0.5  # before the benchmark (nothing of ours runs): a 1-minute load above this per core is busy


def _own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its live descendants (with theirs)."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # exited between the listing and the read: its parent counts it once reaped
            continue
        # a live child's own reaped children are in its children_* (they reach us when it is reaped);
        # a grandchild still alive is listed itself
        total += c.user + c.system + c.children_user + c.children_system
    return total


@dataclass
class CpuSample:
    """Counters at one moment: the machine's busy and steal CPU seconds (all cores), ours, the clock."""

    t: float
    busy_s: float
    steal_s: float
    total_s: float
    own_s: float

    @classmethod
    def now(cls) -> "CpuSample":
        import psutil

        c = psutil.cpu_times()
        idle = c.idle + getattr(c, "iowait", 0.0)
        steal = getattr(c, "steal", 0.0)
        total = sum(getattr(c, f) for f in c._fields if f not in ("guest", "guest_nice"))  # guest is in user
        return cls(time.monotonic(), total - idle - steal, steal, total, _own_cpu_s())


@dataclass
class Quietness:
    """What others ran between two samples: `others_cores` (CPU seconds per second), the steal
    share, the 1-minute load average and the verdict with its reason."""

    seconds: float
    others_cores: float
    steal: float
    load1: float
    cores: int
    quiet: bool
    why: str

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def judge(a: CpuSample, b: CpuSample, *, cores: int, load1: float | None = None,
          others_max: float = OTHERS_MAX, steal_max: float = STEAL_MAX, load_max: float = LOAD_MAX) -> Quietness:
    """The verdict on the span from `a` to `b`. `load1` (given only when nothing of ours ran in it)
    is judged too."""
    dt = max(b.t - a.t, 1e-9)
    others = max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / dt
    steal = (b.steal_s - a.steal_s) / max(b.total_s - a.total_s, 1e-9)
    why = []
    if others > others_max:
        why.append(f"other processes used {others:.2f} cores (more than {others_max:g})")
    if steal > steal_max:
        why.append(f"steal {steal:.0%} (more than {steal_max:.0%})")
    if load1 is not None and load1 > load_max * cores:
        why.append(f"load average {load1:.2f} on {cores} cores (more than {load_max:g} per core)")
    return Quietness(dt, others, steal, load1 if load1 is not None else float("nan"), cores, not why,
                     "; ".join(why) or "quiet")


def check_quiet(seconds: float = 3.0, **limits) -> Quietness:
    """Watch the machine for `seconds` while this process does nothing else (before a benchmark)."""
    from autotiacc.hardware import usable_cores

    a = CpuSample.now()
    time.sleep(seconds)
    b = CpuSample.now()
    return judge(a, b, cores=usable_cores(), load1=os.getloadavg()[0], **limits)


def top_others(limit: int = 5, interval: float = 0.5) -> list[str]:
    """The processes outside this tree using the most CPU now (for the refusal's message)."""
    import psutil

    mine = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    use = []
    for p in procs:
        try:
            use.append((p.cpu_percent(None), f"{p.info['name']} (pid {p.pid})"))
        except psutil.Error:
            continue
    return [f"{name}: {pct:.0f} %" for pct, name in sorted(use, reverse=True)[:limit] if pct >= 1.0]
