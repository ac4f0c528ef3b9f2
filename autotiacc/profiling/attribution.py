"""Per-module time from torch.profiler's attribution, the same way on CPU and CUDA.

Every module's `forward` is wrapped (a wrapper, not a hook: forward hooks switch off fused
fast paths) in a `record_function` range named `autotiacc.module::<path>` and, on CUDA, an
NVTX range. Nothing is synchronised per module: the forward runs as it would, under
torch.profiler, and the trace is attributed afterwards:

- each operator (CPU) and each kernel or copy (CUDA, linked to the operator that launched it
  by the profiler's correlation id) belongs to the *innermost* module range around it;
- on CPU a module's self time is its range less its child ranges (operators, and the Python
  between them, it ran itself); on CUDA it is the device timeline of its kernels, each kernel
  counted with the idle gap before it (the GPU waiting for that launch), plus, for the model
  itself, any CPU time after the last kernel. Either way the self times of one forward add up
  exactly to that (profiled) forward;
- `busy` is the time spent in operators (CPU) or kernels (CUDA): busy / forward is how much of
  the forward the device actually worked, the first figure of the diagnosis. The profiler
  measures it accurately (CUPTI kernel times; an operator's own time excludes the recording);
- the profiler's own cost lands between operators (it records every one), i.e. in the idle
  part (GPU waiting for launches; Python/dispatch on CPU): ~3 us per operator made a 0.22 ms
  CPU forward 0.37 ms. So a module's time in the *plain* forward is its busy time plus its
  idle time scaled by (plain forward - busy) / (profiled forward - busy): the idle time the
  plain forward really had, spread over modules as the trace spread it. `idle_scale` records
  that factor (at most 1); the shares add up to 100 % of the plain forward unless busy alone
  exceeds it or noise made the plain forward slower than the profiled one, and
  `profiled_ms` / `plain_ms` is the profiler's overhead.

`attribute` works on plain `Span` records, so it is tested on crafted timelines too.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

RANGE_PREFIX = "autotiacc.module::"
ROOT_NAME = "(model)"
FAST_QUANTILE = 0.25


def range_name(path: str) -> str:
    return RANGE_PREFIX + (path or ROOT_NAME)


def path_of(name: str) -> str:
    p = name[len(RANGE_PREFIX):]
    return "" if p == ROOT_NAME else p


@dataclass
class Span:
    """One profiler event on the timeline (microseconds). `kind`: range, op or device."""

    kind: str
    name: str
    start: float
    end: float
    id: int = 0  # correlation id of an op
    link: int = 0  # a device event: the correlation id of the op that launched it
    self_us: float | None = None  # an op's own time (children excluded)

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass
class Forward:
    """One forward, attributed: per path [calls, self_us, busy_us, device events]."""

    wall_us: float
    busy_us: float
    device_events: int
    ops: int
    modules: dict[str, list[float]] = field(default_factory=dict)

    def add(self, path: str, *, calls: int = 0, self_us: float = 0.0, busy_us: float = 0.0, events: int = 0) -> None:
        m = self.modules.setdefault(path, [0, 0.0, 0.0, 0])
        m[0] += calls
        m[1] += self_us
        m[2] += busy_us
        m[3] += events


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def attribute(spans: list[Span], *, device: bool) -> list[Forward]:
    """Attribute a trace to module ranges; one `Forward` per root range, in time order.

    `device=True` (CUDA): self time is the device timeline of the module's kernels (see the
    module docstring); otherwise it is the CPU range time less the child ranges.
    """
    ranges = sorted((s for s in spans if s.kind == "range"), key=lambda s: (s.start, -s.end))
    ops = [s for s in spans if s.kind == "op"]
    items = sorted(ranges + ops, key=lambda s: (s.start, s.kind != "range", -s.end))
    forwards: list[tuple[Span, Forward]] = []
    stack: list[tuple[Span, str, list[float]]] = []  # (range, path, [child range time])
    op_home: dict[int, tuple[int, str]] = {}  # op id -> (forward index, path)
    top_end = -math.inf  # end of the last operator not nested in another one
    for it in items:
        while stack and stack[-1][0].end <= it.start:
            _close(stack.pop(), forwards, device)
        if it.kind == "range":
            path = path_of(it.name)
            if not stack:
                if path != "":  # a module called outside the model's forward: not ours
                    continue
                forwards.append((it, Forward(wall_us=it.dur, busy_us=0.0, device_events=0, ops=0)))
            else:
                stack[-1][2][0] += it.dur
            stack.append((it, path, [0.0]))
            forwards[-1][1].add(path, calls=1)
        elif stack:
            fwd = forwards[-1][1]
            path = stack[-1][1]
            if it.start >= top_end:  # count aten::conv2d, not the convolution calls inside it
                fwd.ops += 1
                top_end = it.end
            if not device:
                own = it.self_us if it.self_us is not None else it.dur
                fwd.add(path, busy_us=own)
                fwd.busy_us += own
            op_home[it.id] = (len(forwards) - 1, path)
    while stack:
        _close(stack.pop(), forwards, device)
    if device:
        _attribute_device([s for s in spans if s.kind == "device"], forwards, op_home)
    return [f for _, f in forwards]


def _close(entry, forwards, device: bool) -> None:
    rng, path, children = entry
    if not device:  # CPU: the range's own time on the timeline
        forwards[-1][1].add(path, self_us=rng.dur - children[0])


def _attribute_device(events: list[Span], forwards: list[tuple[Span, Forward]],
                      op_home: dict[int, tuple[int, str]]) -> None:
    per_forward: dict[int, list[tuple[Span, str]]] = {}
    for ev in events:
        home = op_home.get(ev.link)
        if home is not None:
            per_forward.setdefault(home[0], []).append((ev, home[1]))
    for i, (root, fwd) in enumerate(forwards):
        evs = sorted(per_forward.get(i, []), key=lambda e: e[0].start)
        cursor = root.start  # the GPU's time is the forward's from the moment it was called
        for ev, path in evs:
            slot = max(0.0, ev.end - cursor)  # the kernel and the idle gap before it
            fwd.add(path, self_us=slot, busy_us=ev.dur, events=1)
            cursor = max(cursor, ev.end)
        tail = max(0.0, root.end - cursor)  # CPU work after the last kernel (returning outputs)
        fwd.add("", self_us=tail)
        fwd.wall_us = max(root.end, cursor) - root.start
        fwd.busy_us = _union([(ev.start, ev.end) for ev, _ in evs])
        fwd.device_events = len(evs)


def spans_from_profiler(prof: Any) -> list[Span]:
    """torch.profiler events -> spans: module ranges and operators on the CPU thread that ran
    the model, device events (kernels, copies) with their launching operator's id."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    roots = [e for e in events if e.name == range_name("") and e.device_type == DeviceType.CPU]
    thread = roots[0].thread if roots else None
    out = []
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        if e.device_type == DeviceType.CPU:
            if e.thread != thread or getattr(e, "is_async", False):
                continue
            if e.name.startswith(RANGE_PREFIX):
                out.append(Span("range", e.name, start, end))
            elif not e.is_user_annotation and not getattr(e, "linked_correlation_id", 0):
                out.append(Span("op", e.name, start, end, id=e.id, self_us=e.self_cpu_time_total))
        elif not e.is_user_annotation and getattr(e, "linked_correlation_id", 0) > 0:
            out.append(Span("device", e.name, start, end, link=e.linked_correlation_id))
    return out


class ModuleRanges:
    """Installs or removes the ranged `forward` of every module (an instance attribute, which
    `nn.Module.__call__` picks up), so the plain forward runs without them."""

    def __init__(self, modules: dict[str, Any], *, nvtx: bool) -> None:
        self.items = []
        for path, mod in modules.items():
            own = mod.__dict__.get("forward")  # a module may already carry its own forward
            self.items.append((mod, own, _ranged(path, own if own is not None else mod.forward, nvtx)))

    def install(self, on: bool) -> None:
        for mod, own, ranged in self.items:
            if on:
                mod.__dict__["forward"] = ranged
            elif own is not None:
                mod.__dict__["forward"] = own
            else:
                mod.__dict__.pop("forward", None)


def _ranged(path: str, forward: Callable, nvtx: bool) -> Callable:
    import torch

    name = range_name(path)
    push = torch.cuda.nvtx.range_push if nvtx else None
    pop = torch.cuda.nvtx.range_pop if nvtx else None

    def ranged(*args, **kwargs):
        if push is not None:
            push(name)
        try:
            with torch.profiler.record_function(name):
                return forward(*args, **kwargs)
        finally:
            if pop is not None:
                pop()
    return ranged


def fast_calls(values: list[float], q: float = FAST_QUANTILE) -> list[int]:
    """Indices of the fastest `q` of the samples (at least 3): on a shared machine the slow
    calls are the ones other processes preempted; the plain and the profiled forwards are
    trimmed alike, so their means stay comparable and module times stay additive."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[:max(3, math.ceil(len(values) * q))]


@dataclass
class Attribution:
    """Means over the kept forwards: per path [calls, self_ms, busy_ms, device events];
    forward figures in ms; plain forward samples (no profiler) for the shares."""

    modules: dict[str, list[float]]
    profiled_ms: float
    busy_ms: float
    device_events: float
    ops: float
    plain_ms: float
    plain_samples_ms: list[float]
    profiled_samples_ms: list[float]
    idle_scale: float = 1.0


def profile_forwards(model: Any, inputs: tuple, *, device: str, target_s: float = 1.5, warmup_s: float = 1.0,
                     min_forwards: int = 12, deadline: float | None = None,
                     profiler_started: bool = False) -> Attribution:
    """Blocks of plain forwards (timed, no profiler) alternate with blocks of ranged forwards
    under torch.profiler, until `target_s`; both are trimmed to their fastest quarter. A block
    is about a sixteenth of `target_s`, 2 to 32 forwards (stopping the profiler and parsing
    its trace cost far more than a small model's forward). Past `deadline` (`time.time()`),
    the forwards profiled so far are enough (one block: two at least). `profiler_started`: this
    process already ran torch.profiler once (its one-time start-up is paid)."""
    import torch

    from ..device import is_cuda
    from ..measure import time_once, warm_up

    cuda = is_cuda(device)
    ranges = ModuleRanges(dict(model.named_modules()), nvtx=cuda)

    def plain() -> Any:
        with torch.no_grad():
            return model(*inputs)

    warm_up(plain, device, max_s=warmup_s)
    block = _block_size(plain, device, target_s)
    if not profiler_started:
        _profiled_block(plain, 1, cuda)  # the profiler's one-time start-up (seconds) is not measured
    plain_ms: list[float] = []
    forwards: list[Forward] = []
    start = time.perf_counter()

    def more() -> bool:
        """Until `target_s` and `min_forwards`; past 3x the target (a slow model, a loaded
        machine) four profiled forwards are enough."""
        spent = time.perf_counter() - start
        if deadline is not None and time.time() > deadline and len(forwards) >= 2:  # one block
            return False
        if spent < target_s:
            return True
        if len(forwards) >= min_forwards:
            return False
        return spent < 3 * target_s or len(forwards) < 4

    try:
        while more():
            plain_ms += [time_once(plain, device) for _ in range(block)]
            ranges.install(True)
            try:
                prof = _profiled_block(plain, block, cuda)
            finally:
                ranges.install(False)
            forwards += attribute(spans_from_profiler(prof), device=cuda)
            if len(forwards) >= 50 * min_forwards:
                break
    finally:
        ranges.install(False)
    if not forwards:
        raise RuntimeError("torch.profiler recorded no module ranges for this model's forward")
    walls = [f.wall_us / 1e3 for f in forwards]
    keep = [forwards[i] for i in fast_calls(walls)]
    base = statistics.fmean(plain_ms[i] for i in fast_calls(plain_ms))
    return summarise(keep, base, plain_ms, walls)


def _block_size(plain: Callable[[], Any], device: str, target_s: float) -> int:
    """Forwards per block: about a sixteenth of `target_s`; parsing the trace costs ~100 us per
    event, so at most 32."""
    from ..measure import time_once

    one_s = min(time_once(plain, device) for _ in range(3)) / 1e3  # the fastest: a stall is not the model
    return max(2, min(32, math.ceil(target_s / 16 / max(one_s, 1e-6))))


def _profiled_block(plain: Callable[[], Any], calls: int, cuda: bool) -> Any:
    """`calls` forwards under torch.profiler (CPU operators; CUDA kernels too on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            plain()
        if cuda:
            torch.cuda.synchronize()
    return prof


def summarise(keep: list[Forward], plain_ms: float, plain_samples: list[float] | None = None,
              profiled_samples: list[float] | None = None) -> Attribution:
    """Mean per-module figures over `keep`, with each module's idle time rescaled to the
    plain forward (see the module docstring): self = busy + idle * idle_scale."""
    n = len(keep)
    profiled = statistics.fmean(f.wall_us for f in keep) / 1e3
    busy = statistics.fmean(f.busy_us for f in keep) / 1e3
    idle = profiled - busy
    # the profiler only adds time: a plain forward slower than the profiled one is noise (a
    # loaded machine), so the idle time is never scaled up and the shares then fall short of 100 %
    scale = min(1.0, max(0.0, plain_ms - busy) / idle) if idle > 1e-9 else 1.0
    mods: dict[str, list[float]] = {}
    for f in keep:
        for path, (calls, self_us, busy_us, events) in f.modules.items():
            m = mods.setdefault(path, [0.0, 0.0, 0.0, 0.0])
            m[0] += calls / n
            m[1] += (busy_us + (self_us - busy_us) * scale) / 1e3 / n
            m[2] += busy_us / 1e3 / n
            m[3] += events / n
    return Attribution(modules=mods, profiled_ms=profiled, busy_ms=busy,
                       device_events=statistics.fmean(f.device_events for f in keep),
                       ops=statistics.fmean(f.ops for f in keep), plain_ms=plain_ms,
                       plain_samples_ms=list(plain_samples or []), profiled_samples_ms=list(profiled_samples or []),
                       idle_scale=scale)
