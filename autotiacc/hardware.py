"""Hardware/software fingerprint recorded with every figure, and the check that two match.

`fingerprint()` never initialises CUDA unless CUDA is available and asked for, so
`import autotiacc` stays light.
"""
from __future__ import annotations

import os
import platform
import re
from typing import Any

# Fields that must be equal for two measurements to be comparable.
COMPARABLE_KEYS = ("device", "device_name", "cpu_model", "cpu_count", "torch", "cuda")
# CPU flags that decide which kernels (and precisions) are fast (autotiacc.native_precision reads them).
_INTERESTING_FLAGS = (
    "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "amx_bf16", "amx_int8", "amx_tile", "avx_vnni", "neon", "asimd", "sve",
    "amx_fp16", "bf16", "asimdhp", "asimddp", "i8mm",
)
FLAGS_ENV = "AUTOTIACC_CPU_FLAGS"  # replaces the flags read from /proc/cpuinfo (tests, what-if tunes)


def cpu_flags() -> list[str]:
    """The CPU flags of `_INTERESTING_FLAGS` this machine has, or those `AUTOTIACC_CPU_FLAGS`
    lists (comma- or space-separated; empty: none), which every process of a tune inherits."""
    injected = os.environ.get(FLAGS_ENV)
    if injected is None:
        return _cpu_info()[1]
    given = set(injected.replace(",", " ").split())
    unknown = sorted(given.difference(_INTERESTING_FLAGS))
    if unknown:
        from .errors import UserInputError

        raise UserInputError(f"`{FLAGS_ENV}` names unknown flag(s) {', '.join(unknown)}: use names from "
                             f"/proc/cpuinfo among {', '.join(_INTERESTING_FLAGS)}, or unset it.")
    return [f for f in _INTERESTING_FLAGS if f in given]


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
        f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        if f:
            have = set(f.group(1).split())
            flags = [x for x in _INTERESTING_FLAGS if x in have]
    except OSError:
        pass
    return model, flags


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware), the ceiling for thread-count knobs."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def fingerprint(device: str = "cpu") -> dict[str, Any]:
    """Describe the machine and software a measurement was taken on."""
    import torch

    cpu_model, flags = _cpu_info()[0], cpu_flags()
    fp: dict[str, Any] = {
        "device": "cuda" if str(device).startswith("cuda") else "cpu",
        "device_name": cpu_model,
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cpu_count": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if fp_cuda_ok(device) else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if FLAGS_ENV in os.environ:  # said, so no figure passes for one of this CPU's own flags
        fp["cpu_flags_source"] = FLAGS_ENV
    if fp["device"] == "cuda" and torch.cuda.is_available():
        gpu = gpu_info(torch.device(device).index or 0)
        fp["device_name"] = gpu["name"]
        fp.update({k: gpu[k] for k in ("capability", "gpu_memory_gb", "driver")})
    try:
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        fp["onnxruntime"] = None
    fp["openvino"] = _package_version("openvino")  # read from its metadata: importing it costs 0.3 s
    return fp


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gpu_info(index: int) -> dict[str, Any]:
    """Name, compute capability, memory and driver of one visible CUDA device (CUDA must be available)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return {"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gb": round(props.total_memory / 2**30, 1), "driver": _driver_version(),
            "cuda_runtime": torch.version.cuda}


def _driver_version() -> str | None:
    """The NVIDIA driver (pynvml, optional), else the CUDA version the driver supports."""
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional: pynvml missing or NVML not loadable
        pass
    try:
        from .torch_compat import cuda_driver_version

        v = cuda_driver_version()
        return f"supports CUDA {v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - private API; the fingerprint does without it
        return None


def env_lines(device: str) -> list[str]:
    """`autotiacc env`: the fingerprint a plan made on `device` records, then every visible GPU,
    or a line saying there is none."""
    import torch

    fp = fingerprint(device)
    lines = [f"- fingerprint_id: {fingerprint_id(fp)}"] + [f"- {k}: {v}" for k, v in fp.items()]
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return lines + [f"- gpu: no CUDA device (torch {torch.__version__} is {build})"]
    for i in range(torch.cuda.device_count()):
        g = gpu_info(i)
        lines.append(f"- gpu{i}: {g['name']}, capability {g['capability']}, {g['gpu_memory_gb']} GiB, "
                     f"driver {g['driver']}, CUDA runtime {g['cuda_runtime']}")
    return lines


def fp_cuda_ok(device: str) -> bool:
    return str(device).startswith("cuda")


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of comparable fields that differ, empty when the two match."""
    diffs = []
    for key in COMPARABLE_KEYS:
        if recorded.get(key) != current.get(key):
            diffs.append(f"{key}: plan has {recorded.get(key)!r}, this machine has {current.get(key)!r}")
    return diffs


def fingerprint_id(fp: dict[str, Any]) -> str:
    """Short stable name for a fingerprint, used to file reference profiles and results."""
    import hashlib

    key = "|".join(str(fp.get(k)) for k in COMPARABLE_KEYS)
    slug = re.sub(r"[^a-z0-9]+", "-", str(fp.get("device_name", "unknown")).lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
