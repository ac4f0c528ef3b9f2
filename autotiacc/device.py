"""The one place that knows about devices: naming, moving, syncing, peak memory, process flags.

Every other module goes through here, so "the model stayed on the CPU while its inputs
moved to CUDA" has one place to be right in. Nothing here touches CUDA at import time:
torch is imported inside the functions, and CUDA is queried only when a CUDA device is asked for.

`meta` is accepted by the library (not by the CLI): a model and inputs moved there run
shape-only forwards, which is how the tests prove placement on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from .errors import UserInputError, WorkloadError
from .torch_compat import tree_map

# Process-wide switches a candidate may set; each is restored when its scope ends.
FLAGS = ("cuda_matmul_tf32", "cudnn_tf32", "cudnn_benchmark", "float32_matmul_precision")
_UNITS = {"": 1 / 2**20, "b": 1 / 2**20, "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024, "m": 1, "mb": 1, "mib": 1,
          "g": 1024, "gb": 1024, "gib": 1024, "t": 2**20, "tb": 2**20, "tib": 2**20}


# -- naming ---------------------------------------------------------------------------------
def is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def is_meta(device: Any) -> bool:
    return str(device) == "meta"


def resolve_device(spec: str | None = "auto", *, allow_meta: bool = True, name: str = "--device") -> str:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N` or `meta` -> a device
    string that exists here; raises `UserInputError` naming the fix otherwise."""
    raw = "auto" if spec is None else str(spec).strip().lower()
    if raw == "cpu" or (raw == "meta" and allow_meta):
        return raw
    if raw == "auto":
        return "cuda" if cuda_available() else "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", raw)
    if not m:
        allowed = "auto, cpu, cuda or cuda:N" + (" (or meta)" if allow_meta else "")
        raise UserInputError(f"`{name}` got {spec!r}: use {allowed}.")
    if not cuda_available():
        raise UserInputError(f"`{name}` got {spec!r} but this process sees no CUDA device (torch "
                             f"{_torch_version()}); use --device cpu, or --device auto to take a GPU when there is one.")
    import torch

    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UserInputError(f"`{name}` got {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    return raw


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _torch_version() -> str:
    import torch

    return torch.__version__


def use_device(device: Any) -> None:
    """Make `cuda:N` this process's current CUDA device (streams, events, autocast follow it);
    nothing for other devices, so CPU runs never initialise CUDA."""
    if is_cuda(device):
        import torch

        dev = torch.device(device)
        if dev.index is not None:  # set_device refuses a bare `cuda`; that one means the current device
            torch.cuda.set_device(dev)


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank of a multi-process job: `cuda` becomes `cuda:LOCAL_RANK`."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def dist_backend(device: str) -> str:
    """torch.distributed backend for a device: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if is_cuda(device) else "gloo"


# -- moving ---------------------------------------------------------------------------------
def to_device(obj: Any, device: Any) -> Any:
    """`obj` on `device`: a module (moved in place, returned), a tensor, or any pytree
    (tuple, list, dict, namedtuple) holding either; other leaves pass through unchanged.

    An `nn.Module` is a pytree *leaf*, so a map over tensors alone leaves it behind: this is
    the mistake this function exists to prevent. Pinned tensors are copied with
    `non_blocking=True` (the copy overlaps with compute; the next kernel orders after it).
    """
    import torch

    target = torch.device(device)

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device == target:
                return x
            # pinned host memory -> GPU copies asynchronously; is_pinned only asked then (no CUDA init on CPU runs)
            pinned = target.type == "cuda" and x.device.type == "cpu" and x.is_pinned()
            return x.to(target, non_blocking=pinned)
        if isinstance(x, torch.nn.Module):
            return x.to(target)
        return x

    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return move(obj)
    return tree_map(move, obj)


def module_device(module: Any) -> Any:
    """The device of a module's first parameter (or buffer); CPU when it has neither."""
    import itertools

    import torch

    if hasattr(module, "parameters"):
        for t in itertools.chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")


def move_training(model: Any, optimizer: Any, device: Any) -> None:
    """Move a model to `device` and make its optimizer follow: the optimizer's parameters are
    the model's again (a move may create new Parameter objects, e.g. to `meta`) and its existing
    state (e.g. from a checkpoint) lands beside them; state made later by `step()` is born there."""
    import torch

    old = list(model.parameters())
    to_device(model, device)
    new = {id(o): n for o, n in zip(old, model.parameters()) if o is not n}
    for group in getattr(optimizer, "param_groups", []):
        group["params"] = [new.get(id(p), p) for p in group["params"]]
    state = getattr(optimizer, "state", {})
    for p_old in [p for p in list(state) if id(p) in new]:
        state[new[id(p_old)]] = state.pop(p_old)
    for p, st in state.items():
        for k, v in st.items():
            # scalar `step` counters stay where torch put them (CPU unless fused/capturable)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device != p.device:
                st[k] = to_device(v, p.device)


def synchronize(device: Any) -> None:
    """Wait for queued work on `device` (CUDA); a no-op on CPU and meta."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(torch.device(device))


# -- memory ---------------------------------------------------------------------------------
def parse_memory(text: str | float | int, *, name: str = "--max-memory") -> float:
    """'4GiB', '512M', '2g' -> MiB. A bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserInputError(f"`{name}` got {text!r}: use a positive size such as 512MiB, 4GiB or 2G.")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB. Linux's VmHWM can be reset (below);
    elsewhere the peak is ru_maxrss, the peak since the process started."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource

        import psutil

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return psutil.Process().memory_info().rss / 2**20, peak


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`), so that memory a previous
    candidate freed and this one reuses counts again in its resident-set peak; best effort."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then miss reused pages
        pass


def _reset_rss_peak() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory while a scope runs: `with PeakMemory(device) as pm: ...; pm.peak_mib`.

    CUDA: `torch.cuda.max_memory_allocated` after a reset of the peak counter (`peak_mib`),
    and the peak above what was allocated when the scope began (`delta_mib`: what the scope
    itself added). CPU: the process's resident set high-water mark, reset at the start where
    Linux allows it; `delta_mib` is that peak above the RSS at the start. RSS is coarse:
    pages the allocator freed and reuses are not counted again. Meta: zero.
    """

    def __init__(self, device: Any) -> None:
        self.device = str(device)
        self.peak_mib = 0.0
        self.start_mib = 0.0
        self.source = "none"

    @property
    def delta_mib(self) -> float:
        return max(0.0, self.peak_mib - self.start_mib)

    def __enter__(self) -> "PeakMemory":
        if is_cuda(self.device):
            import torch

            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.start_mib = torch.cuda.memory_allocated(dev) / 2**20
            self.source = "torch.cuda.max_memory_allocated"
        elif not is_meta(self.device):
            _trim_heap()
            reset = _reset_rss_peak()
            self.start_mib = _rss_mib()[0]
            self.source = "process RSS high-water mark" + ("" if reset else " (since process start)")
        return self

    def read(self) -> float:
        """The peak so far (MiB), also stored in `peak_mib`."""
        if is_cuda(self.device):
            import torch

            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            self.peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
        elif not is_meta(self.device):
            self.peak_mib = _rss_mib()[1]
        return self.peak_mib

    def __exit__(self, *exc: Any) -> None:
        self.read()

    def to_dict(self) -> dict[str, Any]:
        return {"peak_mib": round(self.peak_mib, 2), "delta_mib": round(self.delta_mib, 2), "source": self.source}


# -- process-wide flags ---------------------------------------------------------------------
def read_flags() -> dict[str, Any]:
    """The process-wide numeric switches a candidate may change (see `FLAGS`)."""
    import torch

    return {"cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def set_flags(values: dict[str, Any]) -> None:
    """Set some of `FLAGS` (the keys of `read_flags()`); `process_flags` scopes this."""
    import torch

    unknown = set(values) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown process flags {sorted(unknown)}; known: {', '.join(FLAGS)}.")
    if "cuda_matmul_tf32" in values:
        torch.backends.cuda.matmul.allow_tf32 = bool(values["cuda_matmul_tf32"])
    if "cudnn_tf32" in values:
        torch.backends.cudnn.allow_tf32 = bool(values["cudnn_tf32"])
    if "cudnn_benchmark" in values:
        torch.backends.cudnn.benchmark = bool(values["cudnn_benchmark"])
    # last: allow_tf32 also moves the matmul precision, and this one is the finer setting
    if "float32_matmul_precision" in values:
        torch.set_float32_matmul_precision(values["float32_matmul_precision"])


@contextlib.contextmanager
def process_flags(**overrides: Any) -> Iterator[dict[str, Any]]:
    """Snapshot TF32 / cudnn.benchmark / matmul precision, set `overrides` for the scope, and
    restore the snapshot after, so no candidate leaks them into the baseline or the user's process.

    `with process_flags(cuda_matmul_tf32=True, cudnn_tf32=True): ...`; yields the snapshot.
    """
    before = read_flags()
    try:
        set_flags(overrides)
        yield before
    finally:
        set_flags(before)


def check_placement(model: Any, where: Any) -> None:
    """A model whose weights are on the `meta` device has no values to run or time (the inference
    and training contract checks both refuse it)."""
    tensors = list(model.parameters()) + list(model.buffers()) if hasattr(model, "parameters") else []
    meta = sum(1 for t in tensors if t.is_meta)
    if meta:
        raise WorkloadError(f"{where}: {meta} of the model's {len(tensors)} parameters and buffers are on the `meta` "
                            "device (shapes without values), so it cannot be run or timed; materialise it first, e.g. "
                            "model.to_empty(device='cpu') and load_state_dict(...), then tune it.")
