"""CUDA graphs around an eager or TorchScript runner (static shapes).

A launch-bound model (GPU idle between many small kernels) pays the CPU cost of every launch
on every call; a captured CUDA graph replays all of them with one launch. The rules followed
here are PyTorch's (docs: "CUDA Graphs", `torch.cuda.graph`, `make_graphed_callables`):

- warm up on a side stream before capture (lazy initialisation, cuDNN autotuning and
  TorchScript's profiling runs must not happen inside the capture), and capture on that same
  stream (one stream for warm-up and capture: library handles are cached per stream);
- the graph reads fixed addresses: each call copies its inputs into static input buffers and
  replays; the static outputs are overwritten by the next replay, so they are cloned;
- autocast's weight-cast cache is off during warm-up and capture: a cast cached outside the
  graph's memory pool would be freed when the caller's autocast region ends, while the graph
  keeps reading it;
- shapes, dtypes and strides are static: a call with another signature gets its own graph
  (up to `MAX_GRAPHS`); beyond that the runner runs without a graph and says so once.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

from ..errors import UserInputError
from ..torch_compat import tree_map

WARMUP_CALLS = 5  # docs use 3; TorchScript's profiling executor specialises on its first runs
MAX_GRAPHS = 4


def require_cuda(device: str) -> None:
    """Raise a clear error unless `device` is a CUDA device that is available."""
    import torch

    from ..device import cuda_available, is_cuda

    if not is_cuda(device):
        raise UserInputError(f"`cuda_graphs` needs a CUDA device, got device {device!r}: set cuda_graphs=false "
                             "or tune with --device cuda.")
    if not cuda_available():
        raise UserInputError(f"`cuda_graphs` needs CUDA, and torch {torch.__version__} sees no CUDA device here: "
                             "set cuda_graphs=false or run on a machine with a GPU.")


def _signature(tensors: list) -> tuple:
    return tuple((tuple(t.shape), t.dtype, tuple(t.stride()), str(t.device)) for t in tensors)


@contextlib.contextmanager
def _no_autocast_cache():
    import torch

    if not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


def capture_cuda_graph(runner: Callable[..., Any], inputs: list) -> tuple[Any, list, Any]:
    """Capture `runner(*inputs)` in a CUDA graph: (the graph, its static inputs, its static outputs)."""
    import torch

    static = [torch.empty_like(t).copy_(t) for t in inputs]  # empty_like keeps the strides
    stream = torch.cuda.Stream(device=static[0].device if static else None)
    stream.wait_stream(torch.cuda.current_stream())
    with _no_autocast_cache():
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                runner(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = runner(*static)
    return graph, static, out


class GraphReplays:
    """Calls `runner(*inputs)` through captured replays, one per input signature (captured on its
    first call, up to `MAX_GRAPHS`; other signatures then run `runner` directly, said once).
    Inputs must be tensors; each call copies them into the replay's static inputs, and the
    outputs are cloned pytrees of tensors (the next replay overwrites the static ones).

    `capture(runner, inputs)` returns (replay, static inputs, static outputs): `replay.replay()`
    re-runs the captured work reading the static inputs and writing the static outputs. This
    bookkeeping is apart from the capture so that it runs, and is tested, without a GPU.
    """

    def __init__(self, runner: Callable[..., Any],
                 capture: Callable[[Callable[..., Any], list], tuple[Any, list, Any]]) -> None:
        self.runner, self._capture = runner, capture
        self._graphs: dict[tuple, tuple[Any, list, Any]] = {}  # signature -> (replay, static inputs, static out)
        self._warned = False

    def __call__(self, *inputs: Any) -> Any:
        import torch

        if not all(isinstance(t, torch.Tensor) for t in inputs):
            raise UserInputError("`cuda_graphs` needs tensor inputs only (the graph copies them into fixed "
                                 "buffers): set cuda_graphs=false for this model.")
        key = _signature(list(inputs))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_GRAPHS:
                if not self._warned:
                    warnings.warn(f"cuda_graphs: more than {MAX_GRAPHS} input shapes seen; other shapes run "
                                  "without a CUDA graph.", stacklevel=2)
                    self._warned = True
                return self.runner(*inputs)
            entry = self._graphs[key] = self._capture(self.runner, list(inputs))
        graph, static, out = entry
        for buf, t in zip(static, inputs):
            buf.copy_(t, non_blocking=True)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    @property
    def graphs(self) -> int:
        return len(self._graphs)


class CUDAGraphRunner(GraphReplays):
    """`GraphReplays` of CUDA graphs on `device` (a CUDA device that is available)."""

    def __init__(self, runner: Callable[..., Any], device: str) -> None:
        require_cuda(device)
        super().__init__(runner, capture_cuda_graph)
        self.device = device
