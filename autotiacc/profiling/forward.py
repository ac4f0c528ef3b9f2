"""Per-module profile of one forward pass: where the time goes, FLOPs, bytes, peak memory,
GPU counters, and a diagnosis of what bounds the forward.

Time per module comes from torch.profiler's attribution (`attribution`):
every module runs inside a `record_function` range (and an NVTX range on CUDA), nothing is
synchronised per module, and each operator (CPU) or kernel (CUDA) is attributed to the
innermost module range around it. Every module gets a *self* time (its own operators or
kernels and the idle time before them) and an *inclusive* time (its subtree); the self times
add up to the forward measured without the profiler (`shares_sum`, interleaved in the same
process). TorchScript archives run their submodules inside the TorchScript interpreter: they
get a whole-model entry and the torch.profiler operator table instead (`method: "profiler_ops"`).

The profile also names the *candidate groups* for per-layer precision: modules that own
parameters, coarsened to blocks that each carry a real share of the time.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from .groups import MIN_GROUP_SHARE, candidate_groups
from .schema import METHOD, SCHEMA, SCHEMA_VERSION, ModuleStat
from ..torch_compat import tree_flatten

TOP_OPS = 15


def _nbytes(obj: Any) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor))


def _is_script(model: Any) -> bool:
    import torch

    return isinstance(model, torch.jit.ScriptModule)


def _gpu_tools(device: str) -> tuple[Any, list[str]]:
    """(pynvml handle or None, what was not available and why). NVTX ranges need nothing
    beyond torch (`torch.cuda.nvtx`)."""
    if not device.startswith("cuda"):
        return None, ["NVTX ranges (no CUDA device)", "pynvml GPU sampling (no CUDA device)"]
    from .gpu import nvml_handle

    handle, why = nvml_handle(device)
    return handle, [why] if why else []


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
                  warmup_s: float = 1.0, coverage: float = 0.9, max_groups: int = 8,
                  min_group_share: float = MIN_GROUP_SHARE, deadline: float | None = None) -> dict[str, Any]:
    """Profile `model(*inputs)`; returns the profile.json content (without workload fields).

    The plain forward is timed interleaved with the profiled one, so `shares_sum` tells how
    much of the measured forward the module self times explain. With a `deadline`
    (`time.time()`), warm-up and attribution shrink to fit before it (the attribution ends by
    half the time left, with the forwards it has), and past it the page-fault count is skipped
    (said in `unavailable`).
    """
    import torch

    nvml, unavailable = _gpu_tools(device)
    if deadline is not None:  # a short share: warm-up and attribution shrink with it (they keep their minimum calls)
        left = max(0.0, deadline - time.time())
        warmup_s, target_s = min(warmup_s, 0.2 * left), min(target_s, 0.4 * left)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # so max_memory_allocated is this profile's peak
    result: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device": device}
    ops, _, peak_activation = _op_table(model, inputs, device)
    result["ops"] = ops

    def plain() -> Any:
        with torch.no_grad():
            return model(*inputs)

    timed = _whole_model if _is_script(model) or not hasattr(model, "named_modules") else _per_module
    stats, busy, events = timed(model, inputs, plain, result, unavailable, device=device, target_s=target_s,
                                warmup_s=warmup_s, deadline=deadline)
    if nvml is not None:
        from .gpu import nvml_during

        result["gpu"] = nvml_during(nvml, plain, device)
    result["modules"] = [asdict(s) for s in stats]
    result["memory"] = _memory(model, stats, peak_activation, device)
    result["diagnosis"] = _diagnosis(result, stats, busy, events, device, nvml)
    _count_page_faults(result, plain, unavailable, device=device, deadline=deadline)
    result["unavailable"] = unavailable
    result.setdefault("nvtx", False)
    result["groups"] = candidate_groups(result["modules"], model, coverage=coverage, max_groups=max_groups,
                                        min_share=min_group_share)
    if not result["groups"] and result["method"] == METHOD:
        unavailable.append(f"per-layer precision groups: no parameter-owning blocks of >= {min_group_share:.0%} "
                           "each that together carry half of the forward")
    return result


def _whole_model(model: Any, inputs: tuple, plain, result: dict[str, Any], unavailable: list[str], *, device: str,
                 target_s: float, warmup_s: float, deadline: float | None) -> tuple[list[ModuleStat], None, None]:
    """TorchScript and export archives: one whole-model entry (their submodules run inside the
    interpreter) and the operator table; no busy time or events to diagnose from."""
    from ..measure import measure_interleaved

    timing = measure_interleaved({"forward": plain}, device, target_s=target_s, warmup_s=warmup_s)["forward"]
    stats = [ModuleStat(path="", type=_type_name(model), calls=1, inclusive_ms=timing.median,
                        self_ms=timing.median, inclusive_share=1.0, self_share=1.0,
                        param_bytes=_param_bytes(model), has_params=True)]
    result.update(method="profiler_ops", forward=timing.summary(), timed_forward=None, shares_sum=1.0,
                  timer_overhead=None)
    unavailable.append("per-module times (TorchScript runs submodules inside its interpreter, where "
                       "Python-level module calls do not happen): see the operator table instead")
    try:
        stats[0].flops = _flops_by_path(model, inputs).get("", 0)
    except Exception as exc:  # noqa: BLE001 - flop counting is decoration
        unavailable.append(f"FLOPs ({type(exc).__name__})")
    return stats, None, None


def _per_module(model: Any, inputs: tuple, plain, result: dict[str, Any], unavailable: list[str], *, device: str,
                target_s: float, warmup_s: float, deadline: float | None) -> tuple[list[ModuleStat], float, float]:
    """An nn.Module: per-module self and inclusive times from the profiler's attribution, FLOPs
    and output bytes; returns the stats, busy ms and events (kernels on CUDA, operators on a CPU)."""
    from ..measure import Timing
    from .attribution import profile_forwards

    # the operator table already paid the profiler's one-time start-up; the attribution ends by
    # half the time left, so FLOPs, page faults and the groups still fit in a short share
    half = None if deadline is None else time.time() + 0.5 * max(0.0, deadline - time.time())
    att = profile_forwards(model, inputs, device=device, target_s=target_s, warmup_s=warmup_s, deadline=half,
                           profiler_started=True)
    modules = dict(model.named_modules())
    flops, out_bytes = _flops_and_bytes(model, inputs, modules)
    if flops is None:
        flops = {}
        unavailable.append("FLOPs (torch.utils.flop_counter failed on this model)")
    stats = _module_stats(modules, att, flops, out_bytes)
    result.update(method=METHOD, forward=Timing(att.plain_samples_ms).summary(),
                  timed_forward=Timing(att.profiled_samples_ms).summary(),
                  forward_fast_mean_ms=att.plain_ms, profiled_fast_mean_ms=att.profiled_ms,
                  shares_sum=sum(s.self_share for s in stats), idle_scale=att.idle_scale,
                  timer_overhead=att.profiled_ms / att.plain_ms - 1 if att.plain_ms else None,
                  busy_ms=att.busy_ms, device_events_per_forward=att.device_events,
                  ops_per_forward=att.ops, nvtx=device.startswith("cuda"))
    return stats, att.busy_ms, att.device_events if device.startswith("cuda") else att.ops


def _count_page_faults(result: dict[str, Any], plain, unavailable: list[str], *, device: str,
                       deadline: float | None) -> None:
    """On a CPU, page faults per forward and what they say of the allocator (skipped past the deadline)."""
    if device.startswith("cuda"):
        return
    if deadline is not None and time.time() > deadline:
        unavailable.append("page faults per forward (skipped: the profile's share of the budget ran out)")
        return
    from .diagnosis import allocator_finding

    # a count, not a timing: a few calls give it; one call back on the plain path (FLOPs were
    # counted on the unfused one) before counting
    result["page_faults_per_forward"] = faults = _page_faults_per_call(plain, calls=4, warm=1)
    finding = allocator_finding(faults)
    if finding:
        result["diagnosis"]["allocator"] = finding


def _module_stats(modules: dict[str, Any], att, flops: dict[str, int], out_bytes: dict[str, int]) -> list[ModuleStat]:
    """One entry per module: attributed self/busy times; inclusive = its subtree's self times."""
    base = att.plain_ms or 1.0
    stats = []
    for path, mod in modules.items():
        calls, self_ms, busy_ms, events = att.modules.get(path, (0, 0.0, 0.0, 0))
        prefix = path + "."
        incl = sum(v[1] for p, v in att.modules.items() if p == path or not path or p.startswith(prefix))
        stats.append(ModuleStat(path=path, type=type(mod).__name__, calls=round(calls), inclusive_ms=incl,
                                self_ms=self_ms, inclusive_share=incl / base, self_share=self_ms / base,
                                flops=flops.get(path, 0), param_bytes=_param_bytes(mod),
                                activation_bytes=out_bytes.get(path, 0),
                                has_params=any(True for _ in mod.parameters()), busy_ms=busy_ms,
                                device_events=events))
    return stats


def _page_faults_per_call(fn, calls: int = 10, warm: int = 2) -> float | None:
    """Minor page faults of this process per call of `fn`, after `warm` calls (None where
    getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on this OS
        return None
    for _ in range(warm):
        fn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls


def _diagnosis(result: dict[str, Any], stats: list[ModuleStat], busy, events, device: str, nvml) -> dict[str, Any]:
    """The stated diagnosis (see autotiacc.profiling.diagnosis) from this profile's figures."""
    from .diagnosis import diagnose

    if busy is None:
        return {"kind": None, "reason": "not diagnosed: no per-operator attribution for this model "
                                        "(TorchScript/export archives run inside their interpreter)", "figures": {}}
    mods = {s.path: s for s in stats}
    leaves = [s for s in stats if s.calls and s.path and not any(q.startswith(s.path + ".") for q in mods)]
    # bytes moved, a lower bound: parameters read once, each leaf's output written once and read once
    moved = result["memory"]["param_and_buffer_bytes"] + 2 * sum(s.activation_bytes for s in leaves)
    peaks = None
    if device.startswith("cuda"):
        from .gpu import device_peaks

        peaks = device_peaks(device, nvml)
    # the profiled forward is never faster than the plain one but for noise: take the smaller
    forward = min(result["forward_fast_mean_ms"], result["profiled_fast_mean_ms"])
    return diagnose(device=device, forward_ms=forward, busy_ms=busy, device_events=events,
                    flops=float(mods[""].flops if "" in mods else 0), bytes_moved=float(moved), peaks=peaks)


def _type_name(model: Any) -> str:
    return str(getattr(model, "original_name", type(model).__name__))


def _param_bytes(module: Any) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _flops_and_bytes(model, inputs, modules: dict[str, Any]) -> tuple[dict[str, int] | None, dict[str, int]]:
    """FLOPs and output bytes per module. Fused kernels (the TransformerEncoderLayer fast path)
    have no FLOP formula, so count on the unfused path, which does the same arithmetic: a
    forward hook on every module makes PyTorch take it (and records the output's bytes)."""
    out_bytes: dict[str, int] = {}

    def record(path: str):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            out_bytes.setdefault(path, _nbytes(output))
        return hook

    handles = [m.register_forward_hook(record(p)) for p, m in modules.items()]
    try:
        return _flops_by_path(model, inputs), out_bytes
    except Exception:  # noqa: BLE001 - decoration; reported as unavailable by the caller
        return None, out_bytes
    finally:
        for h in handles:
            h.remove()


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


def profile_workload(workload, *, device: str = "cpu", model: Any = None, target_s: float = 1.5,
                     deadline: float | None = None) -> dict[str, Any]:
    """Profile a loaded `Workload` on its example inputs; adds workload and fingerprint fields."""
    from ..device import to_device, use_device
    from ..hardware import fingerprint, fingerprint_id

    use_device(device)
    model = to_device(model if model is not None else workload.build_model(), device)
    inputs = to_device(workload.example_inputs(), device)
    prof = profile_model(model, inputs, device=device, target_s=target_s, deadline=deadline)
    fp = fingerprint(device)
    prof["workload"] = {"name": workload.name, "kind": workload.kind, "batch_size": workload.batch_size,
                        "input_shapes": [list(t.shape) for t in inputs]}
    prof["fingerprint"], prof["fingerprint_id"] = fp, fingerprint_id(fp)
    prof["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return prof
