"""The tuner's hook for dynamic shapes: when a workload has traffic, Optuna also samples the
bucket set (edges per dim from the traffic histogram) and, per bucket, a specialised padded
graph vs one shared dynamic graph; trials run `traffic_eval.evaluate_traffic`; the chosen
buckets are recorded in the plan (`plan.extra["shapes"]`), which `Plan.apply` turns back into
a `BucketedModel`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import UserInputError
from .buckets import ALIGN, BATCH, BucketSpec, infer_axes, quantile_edges
from .traffic import Shape, dim_names, histogram, traffic_to_rows, workload_traffic

# Bucket counts Optuna may pick per dim; capped by the distinct sizes seen and `max_buckets`.
BUCKET_COUNTS = (1, 2, 3, 4, 6)
MAX_BUCKETS = 12
# Unseen in-range shapes whose accuracy is checked too (between the traffic's sizes).
N_UNSEEN = 2


class ShapeTuning:
    """Everything the tuner needs to tune for a traffic mix instead of one shape."""

    def __init__(self, workload, traffic: list[Shape], *, p99_ms: float | None = None,
                 max_buckets: int = MAX_BUCKETS, rounds: int = 10, final_rounds: int = 20,
                 serve_batches: list[int] | None = None) -> None:
        self.workload, self.traffic, self.p99_ms = workload, traffic, p99_ms
        # Throughput objective: the serving batch sizes searched (None: latency objective).
        self.serve_batches = serve_batches
        self.max_buckets, self.rounds, self.final_rounds = max_buckets, rounds, final_rounds
        self.names = dim_names(traffic)
        probe = {n: max(2, min(histogram(traffic, n))) for n in self.names}
        self.axes = infer_axes(workload, self.names, probe)
        self.hist = {n: histogram(traffic, n) for n in self.names}
        # Without pad_inputs only the batch can be padded, and a graph specialised on the batch
        # would still see every size of the other dims: such workloads get the shared runner only.
        self.can_pad = len(self.names) == 1 or workload.user_hook("pad_inputs") is not None
        self._checked = False

    # -- search ---------------------------------------------------------------------------------
    def traffic_id(self) -> str:
        import hashlib
        import json

        rows = traffic_to_rows(self.traffic)
        return hashlib.sha256(json.dumps([rows, self.serve_batches], sort_keys=True).encode()).hexdigest()[:16]

    def _check_study(self, study) -> None:
        """A resumed study must tune the same traffic: its bucket choices depend on it."""
        mine, theirs = self.traffic_id(), study.user_attrs.get("traffic_id")
        if theirs is None:
            study.set_user_attr("traffic_id", mine)
        elif theirs != mine:
            raise UserInputError("this study was tuned for another traffic mix (traffic() or --traffic changed); "
                                 "its trials are not comparable: use another --out or --study.")

    def suggest(self, trial, values: dict[str, dict]) -> dict[str, Any]:
        """Add `shapes` ({edges, padded, label}) to a trial's knob values."""
        if not self._checked:
            self._check_study(trial.study)
            self._checked = True
        edges: dict[str, list[int]] = {}
        budget = self.max_buckets
        serve_batch = None
        if self.serve_batches:
            serve_batch = trial.suggest_categorical("serve_batch", self.serve_batches)
        for name in self.names:
            if name == BATCH and serve_batch:  # full batches of `serve_batch`; smaller ones are padded
                edges[name] = [serve_batch]
                continue
            # The choices must be the same in every trial (Optuna has no dynamic value spaces);
            # the bucket budget is enforced on the count actually used.
            counts = [c for c in BUCKET_COUNTS if c <= len(self.hist[name])] or [1]
            n = trial.suggest_categorical(f"{name}_buckets", counts) if len(counts) > 1 else counts[0]
            n = min(n, budget)
            edges[name] = quantile_edges(self.hist[name], n, align=1 if name == BATCH else ALIGN)
            budget = max(1, budget // len(edges[name]))
        n_buckets = 1
        for e in edges.values():
            n_buckets *= len(e)
        backend = values.get("execution", {}).get("backend", "eager")
        if backend == "eager" or not self.can_pad:
            padded = [False] * n_buckets  # eager runs any shape as is: padding would only add work
        elif backend == "onnxruntime":
            padded = [True] * n_buckets  # an exported graph has fixed shapes
        else:
            mode = trial.suggest_categorical("bucket_graphs", ["specialised", "dynamic", "per_bucket"])
            if mode == "per_bucket":
                padded = [trial.suggest_categorical(f"bucket_{i}_specialised", [True, False])
                          for i in range(n_buckets)]
            else:
                padded = [mode == "specialised"] * n_buckets
        if not any(padded):  # one shared runner serves every shape: the edges only bound the range
            edges = {n: [serve_batch if n == BATCH and serve_batch else max(self.hist[n])] for n in self.names}
            padded = [False]
        spec = BucketSpec(edges=edges, axes=self.axes, padded=padded)
        shapes = {"edges": edges, "padded": padded, "label": spec.label()}
        if serve_batch:
            shapes.update(serve_batch=serve_batch, label=f"serve batch {serve_batch}, {spec.label()}")
        return {**values, "shapes": shapes}

    @staticmethod
    def label(values: dict[str, Any]) -> str:
        """Label suffix naming the buckets; none for the baseline itself (eager, unpadded), so the
        tuner still recognises it as the baseline."""
        from ..knobs import configs_from_params, describe

        shapes = values.get("shapes")
        if not shapes:
            return ""
        if (not any(shapes["padded"]) and not shapes.get("serve_batch")
                and describe(configs_from_params(values)) == describe(configs_from_params({}))):
            return ""
        return f"; {shapes['label']}"

    def final_reserve(self, tops: list) -> float:
        """Seconds the final re-measurement needs: it times baseline + the top candidates for
        `final_rounds` on every shape; scaled from what the trials' measurements took."""
        measured = [float(t.user_attrs.get("measure_s", 0.0)) for t in tops]
        per_cand = max(measured, default=0.0) / 2  # a trial times baseline + one candidate
        build = sum(float(t.user_attrs.get("build_s", 0.0)) for t in tops)
        return build + per_cand * (len(tops) + 1) * self.final_rounds / self.rounds

    def evaluator(self, *, final: bool = False) -> tuple[Callable, dict[str, Any]]:
        """The trial function and its keyword arguments (all picklable)."""
        from .traffic_eval import evaluate_traffic

        return evaluate_traffic, {"traffic": traffic_to_rows(self.traffic), "axes": self.spec_axes(),
                                  "rounds": self.final_rounds if final else self.rounds, "p99_ms": self.p99_ms,
                                  "check_shapes": self.unseen_shapes() if final else None}

    def spec_axes(self) -> dict[str, list[list[int]]]:
        return {n: [list(a) for a in v] for n, v in self.axes.items()}

    def unseen_shapes(self) -> list[dict[str, Any]]:
        """In-range shapes that are not in the traffic: sizes one above seen ones, and a batch
        size missing between the seen ones when there is one."""
        seen = {s.key() for s in self.traffic}
        batches = sorted(self.hist[BATCH])
        missing = [b for b in range(batches[0], batches[-1]) if b not in self.hist[BATCH]]
        out = []
        for j, s in enumerate(self.traffic[:: max(1, len(self.traffic) // N_UNSEEN)]):
            batch = missing[0] if missing and j == 0 else s.batch_size
            row = {BATCH: batch, **{n: v + 1 for n, v in s.dims}, "weight": 1.0}
            shape = Shape(row[BATCH], tuple(sorted((n, row[n]) for n, _ in s.dims)))
            if shape.key() not in seen and all(row[n] <= max(self.hist[n]) for n in self.names):
                out.append(row)
        return out[:N_UNSEEN]

    # -- the plan -------------------------------------------------------------------------------
    def record(self, plan, values: dict[str, Any] | None, result: dict[str, Any] | None = None) -> None:
        """Store the chosen buckets and the traffic figures in `plan.extra["shapes"]`."""
        if not values or "shapes" not in values:
            return
        shapes = {"edges": values["shapes"]["edges"], "padded": values["shapes"]["padded"],
                  "axes": self.spec_axes(), "label": values["shapes"]["label"],
                  "traffic": traffic_to_rows(self.traffic), "p99_budget_ms": self.p99_ms,
                  "serve_batch": values["shapes"].get("serve_batch")}
        if result:
            for k in ("p99_mix_ms", "padding_waste", "buckets", "per_shape", "samples_per_s"):
                if k in result:
                    shapes[k] = result[k]
        plan.extra["shapes"] = shapes


def shape_tuning_for(workload, *, traffic_file: str | Path | None = None, p99_ms: float | None = None,
                     strategy: Any = None, device: str = "cpu") -> ShapeTuning | None:
    """A ShapeTuning when the workload has traffic (`--traffic` or model.py `traffic()`), else None."""
    if p99_ms is not None and not p99_ms > 0:
        raise UserInputError(f"`--p99-ms` got {p99_ms!r}: use a positive latency budget in ms, e.g. 50.")
    traffic = workload_traffic(workload, traffic_file)
    extra = getattr(strategy, "extra", {}) or {}
    throughput = getattr(strategy, "objective", "latency") == "throughput"
    if traffic is None and throughput:  # no dynamic dims: every request has the tuned batch size
        traffic = [Shape(workload.batch_size or 1, ())]
    if traffic is None:
        if p99_ms is not None:
            raise UserInputError("`--p99-ms` needs a traffic mix: add traffic() to model.py or pass --traffic FILE.")
        return None
    if (device or "cpu") != "cpu":
        raise UserInputError(f"`--device` got {device!r}: traffic tuning is measured on CPU in this version; "
                             "use --device cpu, or drop the traffic to tune one shape on the GPU.")
    if workload.kind != "python" and traffic[0].dims:
        raise UserInputError("traffic tuning needs a model.py whose example_inputs(batch_size, **dims) builds "
                             f"inputs of any shape; {workload.name} is a {workload.kind} file.")
    serve = None
    if throughput:
        serve = [int(b) for b in extra.get("batch_sizes", [1, 2, 4, 8, 16, 32])]
        if not serve or any(b <= 0 for b in serve):
            raise UserInputError(f"strategy `batch_sizes` got {serve!r}: use a list of positive batch sizes.")
    return ShapeTuning(workload, traffic, p99_ms=p99_ms, max_buckets=int(extra.get("max_buckets", MAX_BUCKETS)),
                       rounds=int(extra.get("traffic_rounds", 10)), final_rounds=int(extra.get("final_traffic_rounds", 20)),
                       serve_batches=serve)
