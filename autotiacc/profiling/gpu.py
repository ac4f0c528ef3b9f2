"""GPU counters during a timed window (pynvml, optional: extra `autotiacc[gpu]`) and the
GPU's peak FLOP/s and memory bandwidth, for the diagnosis.

Peaks come from the device's own figures where pynvml gives them (SM count x FP32 lanes per SM
x 2 x max SM clock; DDR memory clock x 2 x bus width), else from a short table of data-centre
GPUs, else they are unknown and the diagnosis says so.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# FP32 lanes per SM by compute capability major.minor (CUDA C programming guide, arithmetic
# instructions throughput table): 64 on Volta/Turing/A100, 128 on GA10x, Ada, Hopper, Blackwell.
_FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64}
# Dense FP32 FLOP/s and memory bytes/s (vendor data sheets; SXM parts): a fallback only.
_PEAK_TABLE = {"H200": (67e12, 4.8e12), "H100": (67e12, 3.35e12), "A100": (19.5e12, 2.0e12),
               "L40S": (91.6e12, 0.864e12), "L4": (30.3e12, 0.3e12), "A10": (31.2e12, 0.6e12),
               "T4": (8.1e12, 0.32e12), "V100": (15.7e12, 0.9e12)}


def nvml_handle(device: str) -> tuple[Any, str | None]:
    """(pynvml handle or None, why not). Lazy import: pynvml is optional."""
    try:
        import pynvml

        pynvml.nvmlInit()
        import torch

        return pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0), None
    except Exception as exc:  # noqa: BLE001 - missing package, no driver, no permission
        return None, (f"pynvml GPU sampling ({type(exc).__name__}: {exc}; `pip install nvidia-ml-py`, "
                      "extra autotiacc[gpu])")


def nvml_sample(handle) -> dict[str, float]:
    import pynvml

    util = pynvml.nvmlDeviceGetUtilizationRates(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return {"gpu_util_pct": float(util.gpu), "mem_util_pct": float(util.memory), "memory_used_mb": mem.used / 2**20,
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "temperature_c": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))}


def nvml_during(handle, fn: Callable[[], Any], device: str, seconds: float = 1.0) -> dict[str, Any]:
    """Sample pynvml while `fn` runs back to back for `seconds` (synchronised every call, so a
    sample sees the forward's own load); the median of each figure and the sample count.
    NVML's utilisation is the share of its sampling period in which any kernel ran."""
    from ..device import synchronize

    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        synchronize(device)
        samples.append(nvml_sample(handle))
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} | {"samples": len(samples),
                                                                                  "window_s": seconds}


def peak_from_specs(*, sms: int, major: int, minor: int, sm_clock_mhz: float, mem_clock_mhz: float,
                    bus_width_bits: int) -> tuple[float, float]:
    """(dense FP32 FLOP/s, memory bytes/s) from the device's specs (an FMA counts 2 FLOPs;
    NVML's memory clock is the DDR base clock, two transfers per cycle)."""
    lanes = _FP32_LANES.get((major, minor), 128 if major >= 8 else 64)
    return sms * lanes * 2 * sm_clock_mhz * 1e6, 2 * mem_clock_mhz * 1e6 * bus_width_bits / 8


def peak_from_name(name: str) -> tuple[float, float] | None:
    for key in sorted(_PEAK_TABLE, key=len, reverse=True):  # "H100" before "H10"-like prefixes
        if key in name.upper():
            return _PEAK_TABLE[key]
    return None


def device_peaks(device: str, handle=None) -> dict[str, Any] | None:
    """{"flops_fp32", "bytes_per_s", "source"} for a CUDA device, or None when unknown."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    if handle is not None:
        try:
            import pynvml

            flops, bw = peak_from_specs(
                sms=props.multi_processor_count, major=props.major, minor=props.minor,
                sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                mem_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                bus_width_bits=pynvml.nvmlDeviceGetMemoryBusWidth(handle))
            return {"flops_fp32": flops, "bytes_per_s": bw, "source": f"{props.name}: SMs x clocks (pynvml)"}
        except Exception:  # noqa: BLE001 - an older driver lacks a call: fall back to the table
            pass
    known = peak_from_name(props.name)
    if known is None:
        return None
    return {"flops_fp32": known[0], "bytes_per_s": known[1], "source": f"{props.name}: data-sheet table"}
