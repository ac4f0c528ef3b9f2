"""What bounds the forward, with the figures behind it, and the search order it implies.

On CUDA (from the attributed profile):
- **launch-bound**: the GPU is busy for less than `LAUNCH_BUSY` of the forward: it waits for
  the CPU to launch many small kernels. CUDA graphs (or torch.compile reduce-overhead) replay
  them with one launch;
- otherwise **compute-bound** or **memory-bound**, by which roofline the kernels sit closer to:
  achieved FLOP/s over the peak vs achieved bytes/s over the peak bandwidth (bytes: parameters
  read once, each module output written once and read once; a lower bound);
- unknown peaks: the arithmetic intensity is given and the kind is not decided.
On CPU: **overhead-bound** when operators take less than `OVERHEAD_BUSY` of the forward
(Python and dispatch between them set the pace: TorchScript, ONNX Runtime and compile remove
it); otherwise not diagnosed, because autotiacc does not know a CPU's peak FLOP/s and bandwidth.

`order_seeds` turns the kind into the order of the stage-1 starting points.

Beside the kind, `allocator_finding` reads the minor page faults of a CPU forward: glibc's
malloc maps blocks above its (dynamic) mmap threshold afresh and unmaps them on free, so an
eager forward can fault in its activations on every call (convnet bs 8 here: ~11,000 faults,
~44 MiB, per call; none with the threshold fixed; experiments/allocator.py).
"""
from __future__ import annotations

from typing import Any

PAGE = 4096
FAULT_MIB = 1.0  # fresh pages per forward above which the allocator is named in the diagnosis
LAUNCH_BUSY = 0.6  # GPU busy share below which the forward is launch-bound
OVERHEAD_BUSY = 0.5  # CPU operator share below which the forward is overhead-bound
KINDS = ("launch-bound", "compute-bound", "memory-bound", "overhead-bound")


def diagnose(*, device: str, forward_ms: float, busy_ms: float, device_events: float, flops: float,
             bytes_moved: float, peaks: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"kind" (one of KINDS or None), "reason", "figures"}: a pure function of the figures."""
    from ..device import is_cuda

    cuda = is_cuda(device)
    busy_share = busy_ms / forward_ms if forward_ms > 0 else 0.0
    fig: dict[str, Any] = {"forward_ms": forward_ms, "busy_ms": busy_ms, "busy_share": busy_share,
                           "flops": flops, "bytes_moved": bytes_moved,
                           "intensity_flop_per_byte": flops / bytes_moved if bytes_moved else None}
    if busy_ms > 0:
        fig["achieved_flops"] = flops / (busy_ms / 1e3)
        fig["achieved_bytes_per_s"] = bytes_moved / (busy_ms / 1e3)
    if not cuda:
        fig["ops_per_forward"] = device_events
        if busy_share < OVERHEAD_BUSY:
            return {"kind": "overhead-bound", "figures": fig,
                    "reason": f"operators run {busy_share:.0%} of the forward ({busy_ms:.3g} of {forward_ms:.3g} ms); "
                              "Python and dispatch between them take the rest"}
        return {"kind": None, "figures": fig,
                "reason": f"not diagnosed on CPU: operators run {busy_share:.0%} of the forward, and compute- vs "
                          "memory-bound needs this CPU's peak FLOP/s and memory bandwidth, which autotiacc "
                          "does not know"}
    fig["kernels_per_forward"] = device_events
    fig["mean_kernel_us"] = busy_ms * 1e3 / device_events if device_events else None
    if busy_share < LAUNCH_BUSY:
        return {"kind": "launch-bound", "figures": fig,
                "reason": f"GPU busy {busy_share:.0%} of the forward ({busy_ms:.3g} of {forward_ms:.3g} ms) over "
                          f"{device_events:.0f} kernels of {fig['mean_kernel_us'] or 0:.3g} us on average: it waits "
                          "for the CPU to launch them"}
    if not peaks or busy_ms <= 0:
        return {"kind": None, "figures": fig,
                "reason": f"GPU busy {busy_share:.0%} of the forward; compute- vs memory-bound not decided: this "
                          "GPU's peak FLOP/s and bandwidth are unknown"}
    fig["flops_of_peak"] = fig["achieved_flops"] / peaks["flops_fp32"]
    fig["bandwidth_of_peak"] = fig["achieved_bytes_per_s"] / peaks["bytes_per_s"]
    fig["peaks"] = peaks
    kind = "compute-bound" if fig["flops_of_peak"] >= fig["bandwidth_of_peak"] else "memory-bound"
    return {"kind": kind, "figures": fig,
            "reason": f"GPU busy {busy_share:.0%} of the forward; kernels reach {fig['flops_of_peak']:.0%} of peak "
                      f"FP32 FLOP/s and {fig['bandwidth_of_peak']:.0%} of peak bandwidth "
                      f"({peaks.get('source', 'peaks')})"}


def _traits(entry: dict[str, dict[str, Any]]) -> dict[str, bool]:
    ex, prec = entry.get("execution", {}), entry.get("precision", {})
    mode = ex.get("compile_mode", "default") if ex.get("backend") == "compile" else ""
    return {"graphs": bool(ex.get("cuda_graphs")) or mode in ("reduce-overhead", "max-autotune"),
            "reduced": str(prec.get("mode", "fp32")).startswith(("fp16", "bf16"))
                       or entry.get("openvino", {}).get("inference_precision") == "bf16",
            "autotuned": mode.startswith("max-autotune"),
            "layout": bool(entry.get("layout", {}).get("channels_last")),
            "compiled": ex.get("backend", "eager") != "eager"}  # TorchScript, compile, an engine: a graph


def _priority(kind: str | None, t: dict[str, bool]) -> int:
    """Lower first. Weights rank what removes the named bottleneck, then what helps next."""
    if kind == "launch-bound":
        return -(4 * t["graphs"] + 2 * t["reduced"] + t["layout"])
    if kind == "compute-bound":
        return -(4 * t["reduced"] + 2 * t["autotuned"] + t["layout"])
    if kind == "memory-bound":
        return -(4 * t["reduced"] + 2 * t["layout"] + t["autotuned"])
    if kind == "overhead-bound":
        return -(4 * t["compiled"])
    return 0


def order_seeds(seeds: list[dict[str, dict[str, Any]]], diagnosis: dict[str, Any] | None) -> list[dict]:
    """The seeds reordered for the diagnosed bottleneck (a stable sort: ties keep the strategy's
    order, cheap builds first); the baseline `{}` stays first; no diagnosis keeps the order."""
    kind = (diagnosis or {}).get("kind")
    return sorted(seeds, key=lambda e: (bool(e), _priority(kind, _traits(e))))


def allocator_finding(faults_per_forward: float | None) -> str | None:
    """A sentence for the report when a CPU forward faults in more than FAULT_MIB of fresh pages."""
    if faults_per_forward is None or faults_per_forward * PAGE < FAULT_MIB * 2**20:
        return None
    return (f"{faults_per_forward:.0f} minor page faults per forward ({faults_per_forward * PAGE / 2**20:.0f} MiB of "
            "fresh pages): the allocator returns activation blocks to the OS after each call and maps them again. "
            "Compiled backends reuse their buffers; for eager, glibc's MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ "
            "(or MALLOC_MMAP_MAX_=0) set when the process starts, or jemalloc/tcmalloc via LD_PRELOAD, keep them "
            "mapped (experiments/allocator.py measures it here). The tune measures in the environment it was started in.")
