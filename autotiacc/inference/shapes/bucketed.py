"""The dispatcher that serves a dynamic-shape workload with its buckets (`buckets.BucketSpec`).

A request goes to the smallest bucket that holds it. A padded bucket pads its inputs up to the
bucket's edges (the batch by repeating the last real row, other dims by the user's
`pad_inputs(inputs, **dims)`) and so compiles exactly one graph; unpadded buckets share one
runner per configuration. Requests beyond the largest edge run the unoptimized model, with a
one-time warning. Dynamo's recompile limit is raised for this model's own calls only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any, Callable, Iterator

from ...engines import fixed_shape_backends
from ...errors import PlanError
from ...knobs import KnobConfig
from .buckets import BATCH, BucketSpec, OutOfRangeWarning, bucket_key
from ...torch_compat import dynamo_limits, tree_map


def _pad_batch(inputs: tuple, axes: list[tuple[int, int]], target: int) -> tuple:
    import torch

    out = list(inputs)
    for i, ax in axes:
        t = out[i]
        extra = target - t.shape[ax]
        if extra > 0:
            last = t.narrow(ax, t.shape[ax] - 1, 1)
            out[i] = torch.cat([t, last.expand(*[extra if d == ax else -1 for d in range(t.dim())])], dim=ax)
    return tuple(out)


def _slice_batch(out: Any, padded: int, real: int) -> Any:
    import torch

    return tree_map(lambda t: t.narrow(0, 0, real) if isinstance(t, torch.Tensor) and t.dim()
                           and t.shape[0] == padded else t, out)


@contextlib.contextmanager
def _recompile_room(n: int) -> Iterator[None]:
    """Dynamo's recompile limit raised to `n` for the calls inside, then restored: every bucket
    graph is a cache entry on the same code object, and past the default limit (8) Dynamo would
    silently fall back to eager; the caller's own compiled code keeps its limits."""
    if not n:
        yield
        return
    with dynamo_limits(recompile_limit=n, cache_size_limit=n):
        yield


class BucketedModel:
    """Serve any in-range shape through per-bucket optimized callables; call it like the model.

    `configs` are the plan's knob configs (each bucket may override some: `spec.knobs`);
    `pad_inputs(inputs, **dims)` pads non-batch dims (needed only when a padded bucket has
    non-batch dims); `unpad_outputs(outputs, **dims)` optionally cuts non-batch padding off the
    outputs (batch padding is always sliced off). Unpadded buckets with the same configs share
    one runner; each padded bucket has its own, built for exactly its shape.
    """

    def __init__(self, model: Any, configs: dict[str, KnobConfig], spec: BucketSpec, *, device: str = "cpu",
                 pad_inputs: Callable | None = None, unpad_outputs: Callable | None = None) -> None:
        self.original, self.configs, self.spec, self.device = model, configs, spec, device
        self.pad_inputs, self.unpad_outputs = pad_inputs, unpad_outputs
        dims = [n for n in spec.names if n != BATCH]
        if dims and any(spec.padded) and pad_inputs is None:
            raise PlanError(f"buckets pad the dims {dims} but no `pad_inputs(inputs, **dims)` was given; pass the "
                            "model file's, e.g. plan.apply(model, pad_inputs=my_model.pad_inputs) (a plan never "
                            "imports the model.py it names).")
        for name in spec.names:
            if name not in spec.axes:
                raise PlanError(f"bucket dim `{name}` has no recorded input axes; re-run the tune.")
        shared: dict[str, Any] = {}
        self.runners: list[Any] = []
        compiles = 0
        for idx, padded in enumerate(spec.padded):
            cfg = spec.configs(idx, configs)
            execution = cfg.get("execution")
            backend = getattr(execution, "backend", "eager")
            if backend in fixed_shape_backends() and not padded:
                raise PlanError(f"bucket {bucket_key(spec.buckets()[idx])} runs {backend}: it must be padded; re-tune.")
            if backend == "compile":  # one graph per padded bucket, one dynamic graph per shared runner
                compiles += 1
                cfg = dict(cfg, execution=dataclasses.replace(execution, dynamic=not padded))
            if padded:
                self.runners.append(self._runner(cfg))
            else:
                key = repr(sorted(cfg.items()))
                self.runners.append(shared.get(key) or shared.setdefault(key, self._runner(cfg)))
        self._recompile_room = compiles + 8 if compiles else 0  # raised only inside this model's calls
        self._warned = False
        self.calls_out_of_range = 0
        self.padding = {"real": 0, "fed": 0}  # input elements, counted on the tensors actually fed

    def _runner(self, configs: dict[str, KnobConfig]) -> Any:
        from ..candidate import OptimizedModel

        return OptimizedModel(self.original, configs, device=self.device)

    def sizes(self, inputs: tuple) -> dict[str, int]:
        out = {}
        for name, places in self.spec.axes.items():
            i, ax = places[0]
            out[name] = int(inputs[i].shape[ax])
        return out

    def __call__(self, *inputs: Any) -> Any:
        with _recompile_room(self._recompile_room):
            return self._dispatch(inputs)

    forward = __call__

    def _dispatch(self, inputs: tuple) -> Any:
        sizes = self.sizes(inputs)
        idx = self.spec.index(sizes)
        if idx is None:
            return self._fallback(inputs, sizes)
        runner = self.runners[idx]
        if not self.spec.padded[idx]:
            if runner._state is None:
                self._build_shared(runner, inputs)
            self._count(inputs, inputs)
            return runner(*inputs)
        edge = self.spec.buckets()[idx]
        padded = inputs
        dims = {n: edge[n] for n in self.spec.names if n != BATCH}
        if any(sizes[n] != edge[n] for n in dims):
            padded = tuple(self.pad_inputs(padded, **dims))
        if BATCH in edge and sizes[BATCH] != edge[BATCH]:
            padded = _pad_batch(padded, self.spec.axes[BATCH], edge[BATCH])
        self._count(inputs, padded)
        out = runner(*padded)
        if BATCH in edge and sizes[BATCH] != edge[BATCH]:
            out = _slice_batch(out, edge[BATCH], sizes[BATCH])
        if self.unpad_outputs is not None:
            out = self.unpad_outputs(out, **{n: sizes[n] for n in dims})
        return out

    def _count(self, real: tuple, fed: tuple) -> None:
        self.padding["real"] += sum(t.numel() for t in real if hasattr(t, "numel"))
        self.padding["fed"] += sum(t.numel() for t in fed if hasattr(t, "numel"))

    def _fallback(self, inputs: tuple, sizes: dict[str, int]) -> Any:
        import torch

        self.calls_out_of_range += 1
        if not self._warned:
            self._warned = True
            limits = ", ".join(f"{n}≤{e[-1]}" for n, e in self.spec.edges.items())
            warnings.warn(f"input shape {sizes} is outside every tuned bucket ({limits}); running the unoptimized "
                          "model for such shapes (warned once). Re-tune with traffic that covers them.",
                          OutOfRangeWarning, stacklevel=4)
        with torch.inference_mode():
            return self.original(*inputs)

    def _build_shared(self, runner: Any, inputs: tuple) -> None:
        """Build the shared runner on the request padded to the largest bucket (batch >= 2, so a
        dynamic graph does not specialise on size 1): the same shape whatever comes first."""
        edge = self.spec.buckets()[-1]
        dims = {n: edge[n] for n in self.spec.names if n != BATCH}
        x = tuple(self.pad_inputs(inputs, **dims)) if dims and self.pad_inputs is not None else inputs
        if BATCH in self.spec.axes:
            x = _pad_batch(x, self.spec.axes[BATCH], max(2, edge.get(BATCH, 2)))
        runner.build(x)

    def prepare(self, make_inputs: Callable[..., tuple]) -> dict[str, float]:
        """Build every bucket now (compile time up front, not on the first request), exactly as
        serving would: one call per bucket with its smallest shape, padded by the dispatcher.
        `make_inputs(batch_size, **dims)` gives inputs of a shape; returns build seconds per bucket
        key (a shared runner's build counts for the first bucket that uses it)."""
        out = {}
        for idx, edge in enumerate(self.spec.buckets()):
            if self.runners[idx]._state is not None:
                continue
            low = {n: (self.edges_below(n, v) + 1) for n, v in edge.items()}
            t0 = time.perf_counter()
            self(*make_inputs(low.get(BATCH, 1), **{n: v for n, v in low.items() if n != BATCH}))
            out[bucket_key(edge)] = time.perf_counter() - t0
        return out

    def edges_below(self, name: str, edge: int) -> int:
        """The edge before `edge` on dim `name` (0 for the first): a bucket holds sizes above it."""
        lower = [e for e in self.spec.edges[name] if e < edge]
        return lower[-1] if lower else 0

    def padding_waste(self) -> float:
        """Share of the input elements fed to the model that were padding, over all calls so far."""
        fed = self.padding["fed"]
        return (fed - self.padding["real"]) / fed if fed else 0.0


def bucketed_from_plan(plan, model: Any, *, device: str = "cpu", pad_inputs: Callable | None = None,
                       unpad_outputs: Callable | None = None) -> BucketedModel:
    """Rebuild the dispatcher a plan recorded; bucket graphs compile on their first request
    (or all at once with `.prepare(make_inputs)`). Nothing is imported from the plan: the
    caller passes `pad_inputs` (and `unpad_outputs`) from its own code."""
    return BucketedModel(model, plan.knobs, plan.shapes.spec, device=device, pad_inputs=pad_inputs,
                         unpad_outputs=unpad_outputs)
