"""Shape buckets: the bucket set, the plan's `shapes` section, and where edges and axes come from.
The dispatcher that serves them is `bucketed.BucketedModel`.

A bucket set is the cartesian product of edges per dynamic dim (`batch_size` and named dims
such as `seq_len`). A request goes to the smallest bucket that holds it. A *padded* bucket is
specialised: its inputs are padded up to the bucket's edges, so it compiles exactly one graph;
the batch is padded by repeating the last real row (rows are independent in eval mode, and a
repeated row never makes an all-padding row that could produce NaN), other dims by the user's
`pad_inputs(inputs, **dims)`. An *unpadded* bucket runs the request's exact shape on one shared
runner (`torch.compile(dynamic=True)` when the backend compiles). So the number of compiled
graphs is bounded by the number of buckets, plus one shared dynamic graph per distinct
configuration of the unpadded buckets. Each bucket may have its own knob configs (backend,
precision) on top of the plan's: e.g. an ONNX Runtime session with fixed shapes for a padded
bucket, bf16 weights for the long ones. Requests beyond the largest edge run the unoptimized
model, with a one-time warning.

`ShapePlan` is the plan's `shapes` section (plan schema version 2): the bucket set, each
bucket's configuration (knob configs serialised with `config_to_dict`, so they resolve only
from the knob registry), the traffic and the figures measured on it. Version 1 plans kept the
same data, without per-bucket configs, in `extra["shapes"]`: `ShapePlan.from_v1` reads them.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import PlanError, UserInputError
from ...knobs import KnobConfig, config_from_dict, config_to_dict, configs_from_params
from ...knobs.base import knob_for_config

BATCH = "batch_size"
# Padded sizes of non-batch dims are rounded up to a multiple of this (vector-friendly shapes),
# never beyond the largest size seen in the traffic.
ALIGN = 8
MAX_PLAN_BUCKETS = 256  # far above what a tune picks (12 by default): a bound for plans read from files

Axes = dict[str, list[tuple[int, int]]]  # dim name -> [(input index, axis), ...]


class OutOfRangeWarning(UserWarning):
    """A request larger than every bucket ran on the unoptimized model."""


Overrides = dict[str, KnobConfig]  # knob name -> config, on top of the plan's knobs


@dataclass
class BucketSpec:
    """Bucket edges per dim, where each dim lives in the inputs, and per bucket (in `buckets()`
    order) whether it pads and which knob configs override the plan's (`{}`: none)."""

    edges: dict[str, list[int]]
    axes: Axes
    padded: list[bool] = field(default_factory=list)
    knobs: list[Overrides] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, e in self.edges.items():
            if not e or any(int(x) <= 0 for x in e) or list(e) != sorted(set(e)):
                raise UserInputError(f"bucket edges for `{name}` got {e!r}; use increasing positive sizes.")
        self.edges = {n: [int(x) for x in e] for n, e in self.edges.items()}
        self.axes = {n: [tuple(a) for a in v] for n, v in self.axes.items()}
        n = math.prod(len(e) for e in self.edges.values())
        if n > MAX_PLAN_BUCKETS:  # each bucket may build its own graph: a plan never asks for thousands
            raise UserInputError(f"{n} buckets ({' x '.join(str(len(e)) for e in self.edges.values())} edges); "
                                 f"use at most {MAX_PLAN_BUCKETS}.")
        if not self.padded:
            self.padded = [True] * n
        if not self.knobs:
            self.knobs = [{} for _ in range(n)]
        for what, got in (("padded", self.padded), ("knobs", self.knobs)):
            if len(got) != n:
                raise UserInputError(f"`{what}` has {len(got)} entries for {n} buckets; give one per bucket.")

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

    def configs(self, idx: int, base: dict[str, KnobConfig]) -> dict[str, KnobConfig]:
        """The knob configs bucket `idx` runs: the plan's, with the bucket's own on top."""
        return {**base, **self.knobs[idx]}

    def label(self) -> str:
        parts = [f"{n}≤{'/'.join(map(str, e))}" for n, e in self.edges.items()]
        own = sum(1 for k in self.knobs if k)
        return (f"{len(self.buckets())} buckets ({', '.join(parts)}; {sum(self.padded)} padded"
                + (f"; {own} with own knobs" if own else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        """Schema-2 JSON: one entry per bucket with its edge, padding and own knob configs."""
        return {"axes": {n: [list(a) for a in v] for n, v in self.axes.items()}, "edges": self.edges,
                "buckets": [{"edge": edge, "padded": p, "knobs": [config_to_dict(c) for c in k.values()]}
                            for edge, p, k in zip(self.buckets(), self.padded, self.knobs)]}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "plan `shapes`") -> "BucketSpec":
        """Read `to_dict`'s JSON, or a version-1 entry ({edges, axes, padded}, no knobs)."""
        if not isinstance(d, dict) or not {"edges", "axes"} <= set(d):
            raise PlanError(f"{where} must hold `edges` and `axes`; got {d!r:.200}.")
        buckets = d.get("buckets")
        if not (isinstance(d["edges"], dict) and isinstance(d["axes"], dict) and isinstance(buckets, (list, type(None)))):
            raise PlanError(f"{where}: `edges` and `axes` must be mappings and `buckets` a list.")
        padded, knobs = list(d.get("padded") or []), []
        if buckets is not None:
            if not all(isinstance(b, dict) and isinstance(b.get("knobs", []), list) for b in buckets):
                raise PlanError(f"{where}: each of `buckets` must be {{edge, padded, knobs: [knob entries]}}.")
            padded = [b.get("padded") is True for b in buckets]
            for b in buckets:
                own = {knob_for_config(c).name: c for c in map(config_from_dict, b.get("knobs", []))}
                if len(own) != len(b.get("knobs", [])):
                    raise PlanError(f"{where}: bucket {b.get('edge')!r:.80} lists a knob twice; one entry per knob.")
                knobs.append(own)
        try:
            spec = cls(edges=dict(d["edges"]), axes=dict(d["axes"]), padded=padded, knobs=knobs)
        except (UserInputError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: {exc}") from None
        if buckets is not None and [b.get("edge") for b in buckets] != spec.buckets():
            raise PlanError(f"{where}: the `edge` of each bucket must follow `edges` in order "
                            f"({spec.buckets()!r:.200}); re-run the tune rather than editing buckets by hand.")
        return spec


def own_label(own: Overrides) -> str:
    """A bucket's own knob configs, short: the fields that differ from each knob's default, or its
    first field when none does (`backend=eager` on a TorchScript plan must still show)."""
    parts = []
    for cfg in own.values():
        default = knob_for_config(cfg).default()
        fields = dataclasses.fields(cfg)
        changed = [f for f in fields if getattr(cfg, f.name) != getattr(default, f.name)] or fields[:1]
        parts += [f"{f.name}={getattr(cfg, f.name)}" for f in changed]
    return ", ".join(parts)


def spec_from_values(shapes: dict[str, Any], axes: Axes) -> BucketSpec:
    """The bucket set a trial's `values["shapes"]` describes ({edges, padded, knobs, ...}; `knobs`
    holds one {knob: {field: value}} override per bucket, as JSON-friendly trial values)."""
    own = shapes.get("knobs") or [{} for _ in shapes["padded"]]
    configs = [configs_from_params(o) for o in own]
    return BucketSpec(edges=shapes["edges"], axes=axes, padded=list(shapes["padded"]),
                      knobs=[{name: full[name] for name in o} for o, full in zip(own, configs)])


@dataclass
class ShapePlan:
    """The `shapes` section of a plan: the buckets and what they were tuned and measured on."""

    spec: BucketSpec
    traffic: list[dict[str, Any]] = field(default_factory=list)
    serve_batch: int | None = None  # throughput objective: the serving batch size
    p99_budget_ms: float | None = None
    label: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # p99_mix_ms, padding_waste, per_shape, buckets...

    FIGURES: ClassVar[tuple[str, ...]] = ("p99_mix_ms", "padding_waste", "buckets", "per_shape", "samples_per_s")

    def __post_init__(self) -> None:
        self.label = self.label or self.spec.label()

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "traffic": self.traffic, "serve_batch": self.serve_batch,
                "p99_budget_ms": self.p99_budget_ms, "label": self.label, "measured": self.measured}

    @classmethod
    def from_dict(cls, d: Any) -> "ShapePlan":
        spec = BucketSpec.from_dict(d)
        measured = d.get("measured") or {}
        if not isinstance(measured, dict) or not isinstance(d.get("traffic") or [], list):
            raise PlanError("plan `shapes`: `measured` must be a mapping and `traffic` a list of rows.")
        return cls(spec, traffic=list(d.get("traffic") or []), serve_batch=d.get("serve_batch"),
                   p99_budget_ms=d.get("p99_budget_ms"), label=str(d.get("label") or ""), measured=measured)

    @classmethod
    def from_v1(cls, d: Any) -> "ShapePlan":
        """A version-1 plan's `extra["shapes"]`: the figures sat beside the buckets."""
        spec = BucketSpec.from_dict(d, where="plan `extra.shapes`")
        return cls(spec, traffic=list(d.get("traffic") or []), serve_batch=d.get("serve_batch"),
                   p99_budget_ms=d.get("p99_budget_ms"), label=str(d.get("label") or ""),
                   measured={k: d[k] for k in cls.FIGURES if k in d})


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


def _inputs_at(workload, sizes: dict[str, int], names: list[str], why: str) -> tuple:
    """example_inputs at these sizes; its UserInputError becomes `why` (with `{exc}` filled in)."""
    try:
        return workload.example_inputs(sizes[BATCH], **{n: sizes[n] for n in names if n != BATCH})
    except UserInputError as exc:
        raise UserInputError(why.format(exc=exc)) from None


def infer_axes(workload, names: list[str], probe: dict[str, int]) -> Axes:
    """Find where each dim lives by building example inputs at two sizes of it and comparing
    shapes: the axes that changed are that dim's. Raises when a dim changes nothing."""
    dims = ", ".join(f"`{n}`" for n in names if n != BATCH)
    base = _inputs_at(workload, probe, names, f"the traffic's dynamic dims {dims} do not fit "
                      "example_inputs(batch_size, **dims): {exc}; make the traffic's columns match "
                      "example_inputs' keyword arguments.")
    axes: Axes = {}
    for name in names:
        bumped = dict(probe)
        bumped[name] = probe[name] + 1
        other = _inputs_at(workload, bumped, names, f"the traffic names dynamic dim `{name}`, but "
                           f"example_inputs(batch_size, {name}=...) fails ({{exc}}); make the traffic's columns "
                           "match example_inputs' keyword arguments.")
        found = [(i, ax) for i, (a, b) in enumerate(zip(base, other))
                 for ax in range(min(a.dim(), b.dim())) if a.shape[ax] != b.shape[ax]]
        if not found:
            raise UserInputError(f"dynamic dim `{name}`: example_inputs(batch_size, {name}=...) returns the same "
                                 f"input shapes for {probe[name]} and {probe[name] + 1}; example_inputs must accept "
                                 f"`{name}` and size its inputs by it.")
        axes[name] = found
    return axes


# -- the dispatcher -----------------------------------------------------------------------------
def bucket_key(edge: dict[str, int]) -> str:
    return "x".join(f"{'b' if n == BATCH else n}{v}" for n, v in edge.items())
