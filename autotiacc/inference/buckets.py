"""Shape buckets and the dispatcher that serves a dynamic-shape workload with them.

A bucket set is the cartesian product of edges per dynamic dim (`batch_size` and named dims
such as `seq_len`). A request goes to the smallest bucket that holds it. A *padded* bucket is
specialised: its inputs are padded up to the bucket's edges, so it compiles exactly one graph;
the batch is padded by repeating the last real row (rows are independent in eval mode, and a
repeated row never makes an all-padding row that could produce NaN), other dims by the user's
`pad_inputs(inputs, **dims)`. An *unpadded* bucket runs the request's exact shape on one shared
runner (`torch.compile(dynamic=True)` when the backend compiles). So the number of compiled
graphs is bounded by the number of buckets, plus the shared dynamic graph.
Requests beyond the largest edge run the unoptimized model, with a one-time warning.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PlanError, UserInputError
from ..knobs import KnobConfig

BATCH = "batch_size"
# Padded sizes of non-batch dims are rounded up to a multiple of this (vector-friendly shapes),
# never beyond the largest size seen in the traffic.
ALIGN = 8

Axes = dict[str, list[tuple[int, int]]]  # dim name -> [(input index, axis), ...]


class OutOfRangeWarning(UserWarning):
    """A request larger than every bucket ran on the unoptimized model."""


@dataclass
class BucketSpec:
    """Bucket edges per dim, which buckets pad, and where each dim lives in the inputs."""

    edges: dict[str, list[int]]
    axes: Axes
    padded: list[bool] = field(default_factory=list)  # one per bucket, in `buckets()` order

    def __post_init__(self) -> None:
        for name, e in self.edges.items():
            if not e or any(int(x) <= 0 for x in e) or list(e) != sorted(set(e)):
                raise UserInputError(f"bucket edges for `{name}` got {e!r}; use increasing positive sizes.")
        self.edges = {n: [int(x) for x in e] for n, e in self.edges.items()}
        self.axes = {n: [tuple(a) for a in v] for n, v in self.axes.items()}
        n = len(self.buckets())
        if not self.padded:
            self.padded = [True] * n
        if len(self.padded) != n:
            raise UserInputError(f"`padded` has {len(self.padded)} entries for {n} buckets; give one per bucket.")

    @property
    def names(self) -> list[str]:
        return list(self.edges)

    def buckets(self) -> list[dict[str, int]]:
        """Every bucket as {dim: edge}, in a fixed order (batch edges vary slowest)."""
        return [dict(zip(self.names, combo)) for combo in itertools.product(*self.edges.values())]

    def index(self, sizes: dict[str, int]) -> int | None:
        """The smallest bucket holding `sizes`, or None when any dim exceeds its largest edge."""
        pos = []
        for name, edges in self.edges.items():
            i = next((k for k, e in enumerate(edges) if e >= sizes[name]), None)
            if i is None:
                return None
            pos.append(i)
        idx = 0
        for name, i in zip(self.names, pos):
            idx = idx * len(self.edges[name]) + i
        return idx

    def label(self) -> str:
        parts = [f"{n}≤{'/'.join(map(str, e))}" for n, e in self.edges.items()]
        return f"{len(self.buckets())} buckets ({', '.join(parts)}; {sum(self.padded)} padded)"

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges, "padded": self.padded,
                "axes": {n: [list(a) for a in v] for n, v in self.axes.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> "BucketSpec":
        if not isinstance(d, dict) or not {"edges", "axes"} <= set(d):
            raise PlanError(f"plan `extra.shapes` must hold `edges` and `axes`; got {d!r:.200}.")
        try:
            return cls(edges=dict(d["edges"]), axes=dict(d["axes"]), padded=list(d.get("padded") or []))
        except UserInputError as exc:
            raise PlanError(f"plan `extra.shapes`: {exc}") from None


# -- choosing edges from the traffic ------------------------------------------------------------
def quantile_edges(hist: dict[int, float], n: int, *, align: int = 1) -> list[int]:
    """`n` edges at the traffic-weighted quantiles of one dim; the last edge is the largest size
    seen. Intermediate edges round up to a multiple of `align` (never past the largest size)."""
    sizes = sorted(hist)
    top = sizes[-1]
    total = sum(hist.values())
    edges: set[int] = {top}
    for k in range(1, n):
        target, acc = total * k / n, 0.0
        for s in sizes:
            acc += hist[s]
            if acc >= target - 1e-12:
                edges.add(min(top, int(math.ceil(s / align) * align)))
                break
    return sorted(edges)


def infer_axes(workload, names: list[str], probe: dict[str, int]) -> Axes:
    """Find where each dim lives by building example inputs at two sizes of it and comparing
    shapes: the axes that changed are that dim's. Raises when a dim changes nothing."""
    try:
        base = workload.example_inputs(probe[BATCH], **{n: probe[n] for n in names if n != BATCH})
    except UserInputError as exc:
        raise UserInputError(f"the traffic's dynamic dims {', '.join(f'`{n}`' for n in names if n != BATCH)} do not fit "
                             f"example_inputs(batch_size, **dims): {exc}; make the traffic's columns match "
                             "example_inputs' keyword arguments.") from None
    axes: Axes = {}
    for name in names:
        bumped = dict(probe)
        bumped[name] = probe[name] + 1
        try:
            other = workload.example_inputs(bumped[BATCH], **{n: bumped[n] for n in names if n != BATCH})
        except UserInputError as exc:
            raise UserInputError(f"the traffic names dynamic dim `{name}`, but example_inputs(batch_size, "
                                 f"{name}=...) fails ({exc}); make the traffic's columns match example_inputs' "
                                 "keyword arguments.") from None
        found = [(i, ax) for i, (a, b) in enumerate(zip(base, other))
                 for ax in range(min(a.dim(), b.dim())) if a.shape[ax] != b.shape[ax]]
        if not found:
            raise UserInputError(f"dynamic dim `{name}`: example_inputs(batch_size, {name}=...) returns the same "
                                 f"input shapes for {probe[name]} and {probe[name] + 1}; example_inputs must accept "
                                 f"`{name}` and size its inputs by it.")
        axes[name] = found
    return axes


# -- the dispatcher -----------------------------------------------------------------------------
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
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.narrow(0, 0, real) if isinstance(t, torch.Tensor) and t.dim()
                           and t.shape[0] == padded else t, out)


def _raise_recompile_limit(n: int) -> None:
    """Every bucket graph is a cache entry on the same code object; Dynamo's default limit (8)
    would silently fall back to eager past it, so make room for all buckets."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


class BucketedModel:
    """Serve any in-range shape through per-bucket optimized callables; call it like the model.

    `configs` are the plan's knob configs; `pad_inputs(inputs, **dims)` pads non-batch dims
    (needed only when a padded bucket has non-batch dims); `unpad_outputs(outputs, **dims)`
    optionally cuts non-batch padding off the outputs (batch padding is always sliced off).
    """

    def __init__(self, model: Any, configs: dict[str, KnobConfig], spec: BucketSpec, *, device: str = "cpu",
                 pad_inputs: Callable | None = None, unpad_outputs: Callable | None = None) -> None:
        from .candidate import OptimizedModel

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
        execution = configs.get("execution")
        compiles = getattr(execution, "backend", "eager") == "compile"
        static = dict(configs, execution=dataclasses.replace(execution, dynamic=False)) if compiles else configs
        shared = dict(configs, execution=dataclasses.replace(execution, dynamic=True)) if compiles else configs
        self.runners: list[Any] = [OptimizedModel(model, static, device=device) if p else None for p in spec.padded]
        self.shared = OptimizedModel(model, shared, device=device) if not all(spec.padded) else None
        if compiles:
            _raise_recompile_limit(len(spec.padded) + 8)
        self._warned = False
        self.calls_out_of_range = 0
        self.padding = {"real": 0, "fed": 0}  # input elements, counted on the tensors actually fed

    def sizes(self, inputs: tuple) -> dict[str, int]:
        out = {}
        for name, places in self.spec.axes.items():
            i, ax = places[0]
            out[name] = int(inputs[i].shape[ax])
        return out

    def __call__(self, *inputs: Any) -> Any:
        sizes = self.sizes(inputs)
        idx = self.spec.index(sizes)
        if idx is None:
            return self._fallback(inputs, sizes)
        if not self.spec.padded[idx]:
            if self.shared._state is None:
                self._build_shared(inputs)
            self._count(inputs, inputs)
            return self.shared(*inputs)
        edge = self.spec.buckets()[idx]
        padded = inputs
        dims = {n: edge[n] for n in self.spec.names if n != BATCH}
        if any(sizes[n] != edge[n] for n in dims):
            padded = tuple(self.pad_inputs(padded, **dims))
        if BATCH in edge and sizes[BATCH] != edge[BATCH]:
            padded = _pad_batch(padded, self.spec.axes[BATCH], edge[BATCH])
        self._count(inputs, padded)
        out = self.runners[idx](*padded)
        if BATCH in edge and sizes[BATCH] != edge[BATCH]:
            out = _slice_batch(out, edge[BATCH], sizes[BATCH])
        if self.unpad_outputs is not None:
            out = self.unpad_outputs(out, **{n: sizes[n] for n in dims})
        return out

    forward = __call__

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
                          OutOfRangeWarning, stacklevel=3)
        with torch.inference_mode():
            return self.original(*inputs)

    def _build_shared(self, inputs: tuple) -> None:
        """Build the shared runner on the request padded to the largest bucket (batch >= 2, so a
        dynamic graph does not specialise on size 1): the same shape whatever comes first."""
        edge = self.spec.buckets()[-1]
        dims = {n: edge[n] for n in self.spec.names if n != BATCH}
        x = tuple(self.pad_inputs(inputs, **dims)) if dims and self.pad_inputs is not None else inputs
        if BATCH in self.spec.axes:
            x = _pad_batch(x, self.spec.axes[BATCH], max(2, edge.get(BATCH, 2)))
        self.shared.build(x)

    def prepare(self, make_inputs: Callable[..., tuple]) -> dict[str, float]:
        """Build every bucket now (compile time up front, not on the first request), exactly as
        serving would: one call per bucket with its smallest shape, padded by the dispatcher.
        `make_inputs(batch_size, **dims)` gives inputs of a shape; returns build seconds per bucket."""
        out = {}
        for idx, edge in enumerate(self.spec.buckets()):
            runner = self.runners[idx] if self.spec.padded[idx] else self.shared
            if runner._state is not None:
                continue
            low = {n: (self.edges_below(n, v) + 1) for n, v in edge.items()}
            t0 = time.perf_counter()
            self(*make_inputs(low.get(BATCH, 1), **{n: v for n, v in low.items() if n != BATCH}))
            out[bucket_key(edge) if self.spec.padded[idx] else "shared"] = time.perf_counter() - t0
        return out

    def edges_below(self, name: str, edge: int) -> int:
        """The edge before `edge` on dim `name` (0 for the first): a bucket holds sizes above it."""
        lower = [e for e in self.spec.edges[name] if e < edge]
        return lower[-1] if lower else 0

    def padding_waste(self) -> float:
        """Share of the input elements fed to the model that were padding, over all calls so far."""
        fed = self.padding["fed"]
        return (fed - self.padding["real"]) / fed if fed else 0.0


def bucket_key(edge: dict[str, int]) -> str:
    return "x".join(f"{'b' if n == BATCH else n}{v}" for n, v in edge.items())


def bucketed_from_plan(plan, model: Any, *, device: str = "cpu", pad_inputs: Callable | None = None,
                       unpad_outputs: Callable | None = None) -> BucketedModel:
    """Rebuild the dispatcher a plan recorded; bucket graphs compile on their first request
    (or all at once with `.prepare(make_inputs)`). The caller passes `pad_inputs`: a plan file
    never makes autotiacc import the model.py whose path it records."""
    spec = BucketSpec.from_dict(plan.extra["shapes"])
    return BucketedModel(model, plan.knobs, spec, device=device, pad_inputs=pad_inputs, unpad_outputs=unpad_outputs)
