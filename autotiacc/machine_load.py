"""Is the machine busy while we time? Load figures sampled around every timing window.

A figure timed beside other work is not the model's: on 2 shared cores one final's eager
windows swung from 39 ms to 544 ms, and a plan recorded 18.9x that measured 1.8x alone.
`LoadProbe` takes two snapshots, around a window, of:

- the CPU time of the cores this process may run on (`/proc/stat`, per CPU, its affinity set):
  busy and steal jiffies;
- this process's own CPU time (all its threads) and its involuntary context switches;
- the 1-minute load average and the runnable tasks (`/proc/loadavg`).

From them, `LoadWindow` knows how many of those cores *other* processes kept busy (their busy
time less ours, per second of the window), the share the hypervisor stole, and how often the
kernel preempted us. A window is **contended** (`LoadWindow.busy`) when

- other processes used at least `OTHERS_SHARE` (a quarter) of the usable cores: half a core
  on 2 cores; a quiet machine's daemons use a few hundredths; or
- steal took at least `STEAL_SHARE` (10 %) of those cores' time;

and it lasted `MIN_WINDOW_S` at least (the counters tick every 10 ms: a shorter window is not judged
alone). Many windows are also judged pooled (`merge_loads`): the others' cores and the steal averaged
over all their seconds, so a model timed in many short windows (a tiny MLP's final: 20 windows
under 0.2 s, beside two CPU-bound processes using 1.7 of 2 cores) is still seen as busy.

The load average and the context switches are recorded and shown, but do not decide: the load
average lags a minute and counts the timing process's own threads; preemptions have no
machine-independent scale. Where `/proc` cannot be read (not Linux), nothing is ever busy.

`peers`: processes doing the same work as this one (the other ranks of a DDP trial), whose CPU
time is ours, not other users': each is taken to use what this process used.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

OTHERS_SHARE = 0.25  # of the usable cores, used by other processes: contention
STEAL_SHARE = 0.10  # of those cores' time, taken by the hypervisor: contention
BUSY_WINDOWS_SHARE = 0.25  # a figure whose windows were busy beyond this share is not reliable
MIN_WINDOW_S = 0.2  # a shorter window is not judged: a 10 ms jiffy is too coarse for it
ROUNDS_SPAN = 1.5  # a speed-up whose rounds' max/min exceeds this is headlined only with the span
QUIET_POLL_S = 0.25  # how often `wait_quiet` looks again


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (affinity-aware)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Snapshot:
    """One reading of the counters (`None` fields: not available here)."""

    t: float  # time.monotonic()
    busy_jiffies: int | None  # user+nice+system+irq+softirq over the usable CPUs
    steal_jiffies: int | None
    total_jiffies: int | None
    own_cpu_s: float  # this process's user+system time, all threads
    nivcsw: int  # this process's involuntary context switches
    load1: float | None
    running: int | None  # runnable tasks on the machine now (ours included)


def _cpu_jiffies(cpus: list[int]) -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies of `cpus` from /proc/stat, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = steal = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name not in want:
            continue
        v = [int(x) for x in rest.split()] + [0] * 10
        user, nice, system, idle, iowait, irq, softirq, st = v[:8]
        busy += user + nice + system + irq + softirq
        steal += st
        total += user + nice + system + idle + iowait + irq + softirq + st
    return (busy, steal, total) if total else None


def _loadavg() -> tuple[float | None, int | None]:
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            parts = fh.read().split()
        return float(parts[0]), int(parts[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None, None


def snapshot(cpus: list[int] | None = None) -> Snapshot:
    jiffies = _cpu_jiffies(cpus if cpus is not None else usable_cpus())
    times = os.times()
    load1, running = _loadavg()
    busy, steal, total = jiffies if jiffies else (None, None, None)
    return Snapshot(t=time.monotonic(), busy_jiffies=busy, steal_jiffies=steal, total_jiffies=total,
                    own_cpu_s=times.user + times.system, nivcsw=resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw,
                    load1=load1, running=running)


@dataclass(frozen=True)
class LoadWindow:
    """What two snapshots say about the machine between them (see the module doc)."""

    seconds: float
    cores: int
    others_cores: float | None  # cores kept busy by other processes, on average
    steal_share: float | None
    nivcsw_per_s: float
    load1: float | None  # the higher of the two readings
    running: int | None

    @property
    def busy(self) -> bool:
        if self.seconds < MIN_WINDOW_S:
            return False
        return ((self.others_cores is not None and self.others_cores >= OTHERS_SHARE * self.cores)
                or (self.steal_share is not None and self.steal_share >= STEAL_SHARE))

    def to_dict(self) -> dict[str, Any]:
        return {"busy": self.busy, "seconds": round(self.seconds, 3), "cores": self.cores,
                "others_cores": _round(self.others_cores), "steal": _round(self.steal_share),
                "nivcsw_per_s": round(self.nivcsw_per_s, 1), "load1": self.load1, "running": self.running}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def window_between(a: Snapshot, b: Snapshot, *, cores: int, peers: int = 1) -> LoadWindow:
    dt = max(b.t - a.t, 1e-6)
    others = steal = None
    if a.busy_jiffies is not None and b.busy_jiffies is not None:
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy_s = (b.busy_jiffies - a.busy_jiffies) / hz
        others = max(0.0, (busy_s - peers * (b.own_cpu_s - a.own_cpu_s)) / dt)
        total = b.total_jiffies - a.total_jiffies
        steal = (b.steal_jiffies - a.steal_jiffies) / total if total > 0 else 0.0
    loads = [x for x in (a.load1, b.load1) if x is not None]
    return LoadWindow(seconds=dt, cores=cores, others_cores=others, steal_share=steal,
                      nivcsw_per_s=(b.nivcsw - a.nivcsw) / dt, load1=max(loads) if loads else None,
                      running=b.running)


class LoadProbe:
    """`with LoadProbe() as probe: <timed work>`, then `probe.window` (a `LoadWindow`)."""

    def __init__(self, *, peers: int = 1) -> None:
        self.cpus = usable_cpus()
        self.peers = peers
        self.window: LoadWindow | None = None

    def __enter__(self) -> "LoadProbe":
        self._start = snapshot(self.cpus)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.window = window_between(self._start, snapshot(self.cpus), cores=len(self.cpus), peers=self.peers)


def wait_quiet(max_s: float, *, peers: int = 1) -> bool:
    """Wait, at most `max_s`, until a `QUIET_POLL_S` stretch with this process idle is not busy.
    True when the machine went quiet in time."""
    deadline = time.monotonic() + max_s
    while time.monotonic() + QUIET_POLL_S <= deadline:  # whole stretches only: a short one is not judged
        with LoadProbe(peers=peers) as probe:
            time.sleep(QUIET_POLL_S)
        if probe.window is not None and not probe.window.busy:
            return True
    return False


# -- verdicts over many windows ------------------------------------------------------------------
def merge_loads(loads: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The summary of several windows' `LoadWindow.to_dict()`: how many were busy, and the worst figures."""
    loads = [x for x in loads if x]
    if not loads:
        return None

    def worst(key: str) -> float | None:
        vals = [x[key] for x in loads if x.get(key) is not None]
        return max(vals) if vals else None

    windows = sum(int(x.get("windows", 1)) for x in loads)
    busy = sum(int(x.get("busy_windows", int(bool(x.get("busy"))))) for x in loads)
    seconds, others_mean, steal_mean = _pooled(loads)
    cores = loads[0].get("cores")
    # the windows as one: judged by the same rule as a single window (`LoadWindow.busy`)
    pooled_busy = bool(cores) and LoadWindow(seconds=seconds, cores=cores, others_cores=others_mean,
                                             steal_share=steal_mean, nivcsw_per_s=0.0, load1=None, running=None).busy
    return {"busy": busy > BUSY_WINDOWS_SHARE * windows or pooled_busy, "windows": windows, "busy_windows": busy,
            "cores": cores, "others_cores": worst("others_cores"), "steal": worst("steal"),
            "nivcsw_per_s": worst("nivcsw_per_s"), "load1": worst("load1"), "seconds": round(seconds, 3),
            "others_mean": _round(others_mean), "steal_mean": _round(steal_mean), "pooled_busy": pooled_busy}


def _pooled(loads: list[dict[str, Any]]) -> tuple[float, float | None, float | None]:
    """(seconds timed, others' cores and steal averaged over them) across windows or merged summaries."""
    seconds = 0.0
    sums: dict[str, float] = {"others": 0.0, "steal": 0.0}
    seen: dict[str, float] = {"others": 0.0, "steal": 0.0}
    for x in loads:
        s = float(x.get("seconds") or 0.0)
        seconds += s
        for key, single in (("others", "others_cores"), ("steal", "steal")):
            v = x.get(f"{key}_mean", x.get(single)) if "windows" in x else x.get(single)
            if v is not None and s > 0:
                sums[key] += float(v) * s
                seen[key] += s
    means = [sums[k] / seen[k] if seen[k] > 0 else None for k in ("others", "steal")]
    return seconds, means[0], means[1]


def load_attrs(load: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's columns from the load of its timing (nothing when it was not sampled)."""
    if not load:
        return {}
    return {"busy": bool(load.get("busy")), "load1": load.get("load1"), "others_cores": load.get("others_cores")}


def busy_reason(load: dict[str, Any] | None) -> str | None:
    """"the machine was busy (load X on N cores, ...)" when more than `BUSY_WINDOWS_SHARE` of the
    windows summarised in `load` (see `merge_loads`; one window's dict too) stayed busy, else None."""
    if not load:
        return None
    summary = load if "windows" in load else merge_loads([load])
    if summary is None or not summary["busy"]:
        return None
    parts = []
    if summary.get("load1") is not None:
        parts.append(f"load {summary['load1']:.1f} on {summary['cores']} cores")
    if summary.get("others_cores") is not None:
        parts.append(f"other processes used up to {summary['others_cores']:.1f} of them")
    if (summary.get("steal") or 0) >= 0.005:
        parts.append(f"steal up to {100 * summary['steal']:.0f} %")
    parts.append(f"{summary['busy_windows']} of {summary['windows']} timing windows busy")
    if summary.get("pooled_busy") and summary.get("others_mean") is not None:
        parts.append(f"others used {summary['others_mean']:.1f} cores on average over the {summary['seconds']:.1f} s timed")
    return "the machine was busy (" + ", ".join(parts) + ")"


def rounds_span_reason(low: float, high: float) -> str | None:
    """Why a speed-up whose rounds gave `low`..`high` cannot be headlined alone (span > `ROUNDS_SPAN`)."""
    if not (low > 0 and high / low > ROUNDS_SPAN):
        return None
    return f"its rounds ranged from {low:.2f}x to {high:.2f}x, more than {ROUNDS_SPAN:g}x apart"


def reliability(load: dict[str, Any] | None, span: tuple[float, float] | None = None) -> dict[str, Any]:
    """A figure's verdict: {"reliable", "reasons", "load"}; "not reliable: ..." is `unreliable_text`."""
    reasons = [r for r in (busy_reason(load), rounds_span_reason(*span) if span else None) if r]
    return {"reliable": not reasons, "reasons": reasons, "load": load}


def unreliable_text(verdict: dict[str, Any] | None) -> str:
    """"not reliable: <reasons>" for a verdict of `reliability`, "" when it is reliable (or absent)."""
    if not verdict or verdict.get("reliable", True):
        return ""
    return "not reliable: " + "; ".join(verdict.get("reasons") or [])


def unreliable_sentence(verdict: dict[str, Any] | None) -> str:
    """" Not reliable: <reasons>." to end a plan's note, "" when the verdict is reliable (or absent)."""
    text = unreliable_text(verdict)
    return f" N{text[1:]}." if text else ""


def verdict_line(verdict: dict[str, Any] | None) -> str:
    """"not reliable: ..." or "reliable: N of M timing windows busy, load X on N cores"; "" unjudged."""
    if not verdict:
        return ""
    if not verdict.get("reliable", True):
        return unreliable_text(verdict)
    load = verdict.get("load") or {}
    if not load.get("windows"):
        return "reliable"
    return (f"reliable: {load.get('busy_windows', 0)} of {load['windows']} timing windows busy, load up to "
            f"{load['load1'] if load.get('load1') is not None else float('nan'):.1f} on {load.get('cores')} cores")
