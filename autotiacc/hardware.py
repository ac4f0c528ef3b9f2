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
# CPU flags that decide which kernels (and precisions) are fast.
_INTERESTING_FLAGS = (
    "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "amx_bf16", "amx_int8", "amx_tile", "avx_vnni", "neon", "asimd", "sve",
)


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

    cpu_model, flags = _cpu_info()
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
    if fp["device"] == "cuda" and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        fp["device_name"] = props.name
        fp["capability"] = f"{props.major}.{props.minor}"
        fp["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    try:
        import onnxruntime  # noqa: F401  (version only; optional backend)

        fp["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        fp["onnxruntime"] = None
    return fp


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
