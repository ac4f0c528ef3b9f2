"""Every private PyTorch name autotiacc uses, in one place (as `engine/optuna_compat.py` is for
Optuna): when a torch release moves one, this module is the only one to change. torch is
imported inside each function, so importing this module costs nothing."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator


# -- pytrees (torch.utils._pytree: the nested tuples/lists/dicts of a model's inputs and outputs) --
def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    import torch.utils._pytree as pytree

    return pytree.tree_flatten(tree)


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_unflatten(leaves, spec)


def tree_leaves(tree: Any) -> list[Any]:
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(tree)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_map(fn, tree)


# -- dynamo (torch.compile's frame compiler) ---------------------------------------------------------
def dynamo_reset() -> None:
    """Drop every compiled graph of this process (memory, recompile limits) and dynamo's counters."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def clear_dynamo_counters() -> None:
    import torch._dynamo.utils

    torch._dynamo.utils.counters.clear()


def compile_stats() -> dict[str, int]:
    """Graphs, graph breaks and recompiles (a guard of a compiled frame failed and it was compiled
    again) counted by dynamo in this process since the counters were last cleared."""
    from torch._dynamo.utils import counters, guard_failures

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(len(v) for v in guard_failures.values()))}


def compiled_frames() -> int:
    """Frames dynamo compiled in this process so far; 0 while it is not loaded (never imports it)."""
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    return int(counters["frames"]["total"]) if counters is not None else 0


@contextlib.contextmanager
def dynamo_limits(**limits: int) -> Iterator[None]:
    """Dynamo's config values (e.g. cache_size_limit) raised for the calls inside, restored after."""
    import torch._dynamo

    cfg = torch._dynamo.config
    before = {k: getattr(cfg, k) for k in limits if hasattr(cfg, k)}
    for k in before:
        setattr(cfg, k, max(getattr(cfg, k), limits[k]))
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(cfg, k, v)


def preload_compile_stack() -> None:
    """Import torch.compile's stack (dynamo and inductor's compile_fx) ahead of its first use."""
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401 - the import is the point


# -- inductor ------------------------------------------------------------------------------------------
def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The inductor options a torch.compile `mode` stands for."""
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def aoti_compile_and_package(program: Any, package_path: str, **kwargs: Any) -> Any:
    import torch._inductor

    return torch._inductor.aoti_compile_and_package(program, package_path=package_path, **kwargs)


def aoti_load_package(path: str, **kwargs: Any) -> Any:
    import torch._inductor

    return torch._inductor.aoti_load_package(path, **kwargs)


# -- CUDA ----------------------------------------------------------------------------------------------
def cuda_driver_version() -> int:
    """The CUDA driver's version (e.g. 12040), without initialising a device."""
    import torch

    return int(torch._C._cuda_getDriverVersion())
