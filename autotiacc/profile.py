"""Per-module profile of one forward pass: where the time goes, FLOPs, bytes, peak memory.

Time per module comes from timing each module's `forward` (a wrapper rather than forward
hooks, which switch off fused fast paths; device sync on CUDA, one NVTX range per module when
the `nvtx` package is there), so every module gets an *inclusive* time and a *self* time
(inclusive less its children's); the self times of all modules add up to the root's time,
and `shares_sum` compares that with the forward measured without the timers (interleaved, in
the same process). TorchScript archives run their submodules inside the TorchScript
interpreter: they get a whole-model entry and the torch.profiler operator table instead
(`method: "profiler_ops"`).

The profile also names the *candidate groups* for per-layer precision: the deepest modules
that ran and own parameters, largest first, until they cover most of the time.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError

SCHEMA = "autotiacc.profile"
SCHEMA_VERSION = 1
PROFILE_FILE = "profile.json"
TOP_OPS = 15


@dataclass
class ModuleStat:
    path: str  # module-tree path; "" is the model itself
    type: str
    calls: int = 0
    inclusive_ms: float = 0.0
    self_ms: float = 0.0
    inclusive_share: float = 0.0  # of the forward measured without timers
    self_share: float = 0.0
    flops: int = 0  # inclusive, per forward (torch.utils.flop_counter)
    param_bytes: int = 0  # inclusive: parameters and buffers of the subtree
    activation_bytes: int = 0  # bytes of this module's outputs, per forward
    has_params: bool = False


@dataclass
class _Clock:
    """Times every module call (wrapped `forward`); a stack attributes children's time."""

    device: str
    nvtx: Any = None
    stack: list[list[Any]] = field(default_factory=list)
    call: dict[str, list[float]] = field(default_factory=dict)  # path -> [incl, self] this forward
    out_bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def now(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()  # attribute GPU work to the module that queued it
        return time.perf_counter()

    def wrap(self, path: str, forward):
        """`forward` timed as module `path`: a wrapper, not a hook, because forward hooks
        switch off fused fast paths (nn.TransformerEncoderLayer checks for them)."""
        def timed(*args, **kwargs):
            if self.nvtx is not None:
                self.nvtx.push_range(path or "model")
            self.stack.append([path, self.now(), 0.0])
            output = forward(*args, **kwargs)
            end = self.now()
            p, start, children = self.stack.pop()
            incl = (end - start) * 1e3
            acc = self.call.setdefault(p, [0.0, 0.0])
            acc[0] += incl
            acc[1] += incl - children
            if self.stack:
                self.stack[-1][2] += incl
            self.calls[p] = self.calls.get(p, 0) + 1
            if p not in self.out_bytes:
                self.out_bytes[p] = _nbytes(output)
            if self.nvtx is not None:
                self.nvtx.pop_range()
            return output
        return timed


def _nbytes(obj: Any) -> int:
    import torch
    import torch.utils._pytree as pytree

    return sum(t.numel() * t.element_size() for t in pytree.tree_flatten(obj)[0] if isinstance(t, torch.Tensor))


def _is_script(model: Any) -> bool:
    import torch

    return isinstance(model, torch.jit.ScriptModule)


def _optional_gpu_tools(device: str) -> tuple[Any, Any, list[str]]:
    """(nvtx module or None, pynvml handle or None, what was not available and why)."""
    missing: list[str] = []
    if not device.startswith("cuda"):
        return None, None, ["NVTX ranges (no CUDA device)", "pynvml GPU sampling (no CUDA device)"]
    try:
        import nvtx
    except ImportError:
        nvtx = None
        missing.append("NVTX ranges (`pip install nvtx`, extra autotiacc[gpu])")
    handle = None
    try:
        import pynvml

        pynvml.nvmlInit()
        import torch

        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
    except Exception as exc:  # noqa: BLE001 - missing package, no driver, no permission
        missing.append(f"pynvml GPU sampling ({type(exc).__name__}: {exc}; `pip install nvidia-ml-py`)")
    return nvtx, handle, missing


def _nvml_sample(handle) -> dict[str, float]:
    import pynvml

    util = pynvml.nvmlDeviceGetUtilizationRates(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return {"gpu_util_pct": float(util.gpu), "memory_used_mb": mem.used / 2**20,
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "temperature_c": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))}


def _flops_by_path(model: Any, inputs: tuple) -> dict[str, int]:
    """Inclusive FLOPs per module path; FlopCounterMode names modules `RootClass.a.b`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    root = type(model).__name__
    out: dict[str, int] = {}
    for name, by_op in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        out[path] = int(sum(by_op.values()))
    return out


def _op_table(model: Any, inputs: tuple, device: str) -> tuple[list[dict[str, Any]], float, int]:
    """torch.profiler operator table of one forward (top ops by self time), the profiled
    forward's time, and the peak of memory allocated during it (bytes above the start)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=acts, profile_memory=True) as prof:
        t0 = time.perf_counter()
        model(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total_ms = (time.perf_counter() - t0) * 1e3
    peak = _peak_alloc(prof)
    cuda = device.startswith("cuda")
    rows = []
    for e in prof.key_averages():
        self_us = (e.self_device_time_total if cuda else e.self_cpu_time_total)
        rows.append({"op": e.key, "calls": int(e.count), "self_ms": self_us / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    covered = sum(r["self_ms"] for r in rows) or 1.0
    for r in rows:
        r["self_share"] = r["self_ms"] / covered
    return rows[:TOP_OPS], total_ms, peak


def _peak_alloc(prof) -> int:
    """Highest running total of allocations minus frees during the profiled call (bytes).
    Kineto's memory events carry both signs; the FunctionEvent view drops most allocations."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += int(e.nbytes())
            peak = max(peak, live)
        return peak
    except (AttributeError, RuntimeError, TypeError):  # profiler internals differ by version
        return 0


def profile_model(model: Any, inputs: tuple, *, device: str = "cpu", target_s: float = 1.5,
                  warmup_s: float = 1.0, coverage: float = 0.9, max_groups: int = 8) -> dict[str, Any]:
    """Profile `model(*inputs)`; returns the profile.json content (without workload fields).

    The forward is timed with and without the module timers interleaved (`measure.measure_interleaved`),
    so `shares_sum` tells how much of the measured forward the module self times explain.
    """
    import torch

    from .measure import measure_interleaved

    nvtx, nvml, unavailable = _optional_gpu_tools(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # so max_memory_allocated is this profile's peak
    result: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device": device}
    ops, _, peak_activation = _op_table(model, inputs, device)
    result["ops"] = ops

    def plain() -> Any:
        with torch.no_grad():
            return model(*inputs)

    if _is_script(model) or not hasattr(model, "named_modules"):
        timing = measure_interleaved({"forward": plain}, device, target_s=target_s, warmup_s=warmup_s)["forward"]
        stats = [ModuleStat(path="", type=_type_name(model), calls=1, inclusive_ms=timing.median,
                            self_ms=timing.median, inclusive_share=1.0, self_share=1.0,
                            param_bytes=_param_bytes(model), has_params=True)]
        result.update(method="profiler_ops", forward=timing.summary(), timed_forward=None, shares_sum=1.0,
                      timer_overhead=None)
        unavailable.append("per-module times (TorchScript runs submodules inside its interpreter, where "
                           "Python-level module calls do not happen): see the operator table instead")
        try:
            flops = _flops_by_path(model, inputs).get("", 0)
            stats[0].flops = flops
        except Exception as exc:  # noqa: BLE001 - flop counting is decoration
            unavailable.append(f"FLOPs ({type(exc).__name__})")
    else:
        stats, timing, hooked, base, flops = _timed_profile(model, inputs, device, nvtx, target_s, warmup_s, plain)
        if flops is None:
            flops = {}
            unavailable.append("FLOPs (torch.utils.flop_counter failed on this model)")
        for s in stats:
            s.flops = flops.get(s.path, 0)
        result.update(method="module_timers", forward=timing.summary(), timed_forward=hooked.summary(),
                      forward_fast_mean_ms=base, shares_sum=sum(s.self_share for s in stats),
                      timer_overhead=hooked.median / timing.median - 1 if timing.median else None)
    if nvml is not None:
        result["gpu"] = _nvml_during(nvml, plain, device)
    result["modules"] = [asdict(s) for s in stats]
    result["memory"] = _memory(model, stats, peak_activation, device)
    result["unavailable"] = unavailable
    result["nvtx"] = nvtx is not None
    result["groups"] = candidate_groups(result["modules"], model, coverage=coverage, max_groups=max_groups)
    return result


def _type_name(model: Any) -> str:
    return str(getattr(model, "original_name", type(model).__name__))


def _param_bytes(module: Any) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


FAST_QUANTILE = 0.25


def _fast_calls(values: list[float], q: float = FAST_QUANTILE) -> list[int]:
    """Indices of the fastest `q` of the samples (at least 3): on a shared machine the slow
    calls are the ones other processes preempted; both the plain and the hooked forward are
    trimmed the same way, so their means stay comparable and module times stay additive."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[:max(3, math.ceil(len(values) * q))]


def _timed_profile(model, inputs, device, nvtx, target_s, warmup_s, plain):
    """Time every module (wrapped forwards), interleaved with the plain forward.

    Module times are means over the fastest quarter of the timed calls (by the model's own
    time): means keep self times additive (they sum to the root's time), trimming keeps them
    robust on a shared machine. The plain forward is summarised the same way and is what shares are relative to.
    Returns (stats, plain timing, hooked timing, calls used, flops by path).
    """
    import torch

    from .measure import Timing, measure_interleaved

    clock = _Clock(device=device, nvtx=nvtx)
    per_call: list[dict[str, list[float]]] = []
    modules = dict(model.named_modules())
    timers = _Timers(modules, clock)

    def timed_forward() -> Any:
        clock.call = {}
        clock.stack.clear()
        with torch.no_grad():
            out = model(*inputs)
        per_call.append(clock.call)
        return out

    try:
        timers.install(True)

        def plain_without_timers() -> Any:
            timers.install(False)
            try:
                return plain()
            finally:
                timers.install(True)
        timings = measure_interleaved({"plain": plain_without_timers, "timed": timed_forward}, device,
                                      min_rounds=40, target_s=target_s, warmup_s=warmup_s)
        calls = {p: c // max(len(per_call), 1) for p, c in clock.calls.items()}
    finally:
        timers.install(False)
    flops = _flops_unfused(model, inputs, modules.values())
    timed = per_call[-timings["timed"].n:]  # the timed calls, not the warm-up
    keep = [timed[i] for i in _fast_calls([c.get("", [0.0])[0] for c in timed])]
    plain_ms = timings["plain"].samples_ms
    base = statistics.fmean(plain_ms[i] for i in _fast_calls(plain_ms))
    stats = []
    for path, mod in modules.items():
        s = ModuleStat(path=path, type=type(mod).__name__, calls=calls.get(path, 0),
                       param_bytes=_param_bytes(mod), activation_bytes=clock.out_bytes.get(path, 0),
                       has_params=any(True for _ in mod.parameters()))
        if calls.get(path):
            s.inclusive_ms = sum(c[path][0] for c in keep if path in c) / len(keep)
            s.self_ms = sum(c[path][1] for c in keep if path in c) / len(keep)
            s.inclusive_share, s.self_share = s.inclusive_ms / base, s.self_ms / base
        stats.append(s)
    return stats, timings["plain"], timings["timed"], base, flops


class _Timers:
    """Installs or removes the timed `forward` of every module (an instance attribute, which
    `nn.Module.__call__` picks up); the plain forward runs with them removed."""

    def __init__(self, modules: dict[str, Any], clock: _Clock) -> None:
        self.items = []
        for path, mod in modules.items():
            own = mod.__dict__.get("forward")  # a module may already carry its own forward
            self.items.append((mod, own, clock.wrap(path, own if own is not None else mod.forward)))

    def install(self, on: bool) -> None:
        for mod, own, timed in self.items:
            if on:
                mod.__dict__["forward"] = timed
            elif own is not None:
                mod.__dict__["forward"] = own
            else:
                mod.__dict__.pop("forward", None)


def _flops_unfused(model, inputs, modules) -> dict[str, int] | None:
    """FLOPs per module. Fused kernels (the TransformerEncoderLayer fast path) have no FLOP
    formula, so count on the unfused path, which does the same arithmetic: a no-op hook on
    every module makes PyTorch take it."""
    handles = [m.register_forward_hook(lambda *a: None) for m in modules]
    try:
        return _flops_by_path(model, inputs)
    except Exception:  # noqa: BLE001 - decoration; reported as unavailable by the caller
        return None
    finally:
        for h in handles:
            h.remove()


def _nvml_during(handle, fn, device: str, seconds: float = 1.0) -> dict[str, Any]:
    """Sample pynvml while the forward runs repeatedly; median of each figure."""
    from .device import synchronize

    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        synchronize(device)
        samples.append(_nvml_sample(handle))
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} | {"samples": len(samples)}


def _memory(model: Any, stats: list[ModuleStat], peak_activation: int, device: str) -> dict[str, Any]:
    import torch

    params = _param_bytes(model) if hasattr(model, "parameters") else 0
    mem = {"param_and_buffer_bytes": params,
           "activation_bytes": sum(s.activation_bytes for s in stats if s.path),
           "peak_forward_alloc_bytes": peak_activation,
           "peak_source": "torch.profiler memory events of one forward (allocations above the start)"}
    if device.startswith("cuda"):
        mem["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return mem


def candidate_groups(modules: list[dict[str, Any]], model: Any, *, coverage: float = 0.9,
                     max_groups: int = 8) -> list[dict[str, Any]]:
    """Per-layer precision candidates: the deepest modules that ran and own parameters (a
    fused TransformerEncoderLayer counts as one: its children never run), largest inclusive
    time first, until they cover `coverage` of their total time or `max_groups` are taken."""
    ran = {m["path"]: m for m in modules if m["calls"] > 0 and m["path"] and m["has_params"]}
    leaves = [m for p, m in ran.items() if not any(q.startswith(p + ".") for q in ran)]
    leaves.sort(key=lambda m: -m["inclusive_ms"])
    total = sum(m["inclusive_ms"] for m in leaves) or 1.0
    linear_paths = _linear_paths(model)
    out, covered = [], 0.0
    for m in leaves:
        if covered >= coverage * total or len(out) >= max_groups:
            break
        covered += m["inclusive_ms"]
        out.append({"path": m["path"], "type": m["type"], "inclusive_share": m["inclusive_share"],
                    "flops": m["flops"], "linear": m["path"] in linear_paths})
    return out


def _linear_paths(model: Any) -> set[str]:
    import torch

    if not hasattr(model, "named_modules") or _is_script(model):
        return set()
    return {p for p, m in model.named_modules() if type(m) is torch.nn.Linear}


def profile_workload(workload, *, device: str = "cpu", model: Any = None, target_s: float = 1.5) -> dict[str, Any]:
    """Profile a loaded `Workload` on its example inputs; adds workload and fingerprint fields."""
    from .device import to_device, use_device
    from .hardware import fingerprint, fingerprint_id

    use_device(device)
    model = to_device(model if model is not None else workload.build_model(), device)
    inputs = to_device(workload.example_inputs(), device)
    prof = profile_model(model, inputs, device=device, target_s=target_s)
    fp = fingerprint(device)
    prof["workload"] = {"name": workload.name, "kind": workload.kind, "batch_size": workload.batch_size,
                        "input_shapes": [list(t.shape) for t in inputs]}
    prof["fingerprint"], prof["fingerprint_id"] = fp, fingerprint_id(fp)
    prof["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return prof


def save_profile(prof: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(prof, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def load_profile(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / PROFILE_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"`profile` {p}: cannot be read ({exc}); give a profile.json written by autotiacc.") from None
    if data.get("schema") != SCHEMA:
        raise UserInputError(f"`profile` {p}: not an autotiacc profile (missing \"schema\": \"{SCHEMA}\").")
    return data


def top_modules(prof: dict[str, Any], n: int = 12, *, by: str = "self_share") -> list[dict[str, Any]]:
    """The `n` modules with the largest share (self time by default), root included."""
    mods = [m for m in prof.get("modules", []) if m.get("calls", 0) > 0]
    return sorted(mods, key=lambda m: -m.get(by, 0.0))[:n]


def opaque_root(prof: dict[str, Any]) -> bool:
    """True when the module breakdown says little (TorchScript, export, a flat forward): the
    model's own self time is most of the forward, so the operator table is the useful view."""
    root = next((m for m in prof.get("modules", []) if m["path"] == ""), None)
    return prof.get("method") != "module_timers" or (root is not None and root["self_share"] > 0.5)


def summary_lines(prof: dict[str, Any], n: int = 10) -> list[str]:
    """A few lines for the terminal: forward time, coverage, the top modules."""
    fwd = prof["forward"]
    lines = [f"forward: {fwd['median_ms']:.3f} ms median (spread {fwd['spread']:.1%}, n={fwd['n']}), "
             f"method {prof['method']}, module self-time shares add up to {prof['shares_sum']:.1%}"]
    for m in top_modules(prof, n):
        lines.append(f"  {m['self_share']:6.1%} self {m['inclusive_share']:6.1%} incl  {m['path'] or '(model)'}"
                     f"  [{m['type']}]  {m['flops'] / 1e6:.1f} MFLOP")
    if opaque_root(prof):
        lines.append("most time is inside the model's own forward (no submodule calls): top operators")
        lines += [f"  {o['self_share']:6.1%}  {o['op']}  x{o['calls']}" for o in prof.get("ops", [])[:n]]
    if prof.get("groups"):
        lines.append("precision groups: " + ", ".join(g["path"] for g in prof["groups"]))
    for what in prof.get("unavailable", []):
        lines.append(f"not available: {what}")
    return lines

