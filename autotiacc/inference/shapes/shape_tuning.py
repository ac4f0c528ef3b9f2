"""The shape dimension of the inference task: one input shape, or a traffic mix with buckets.

`shape_tuning_for(...)` gives the inference task an object with six hooks; `StaticShapes` when
the workload has one input shape, `ShapeTuning` when it has traffic (`--traffic` or model.py
`traffic()`). The task calls them in this order, never asking which of the two it holds:

- `suggest(trial, values, ctx=None)` once per trial, in the tuner's process, after the knobs
  sampled `values` ({knob: {field: value}}); returns the values to evaluate. With traffic, Optuna
  also samples the bucket set (edges per dim from the traffic histogram), which buckets pad to a
  specialised graph, and, given the `SearchContext`, the buckets of large requests' own backend
  and precision (an ONNX Runtime bucket, or one replayed as a CUDA graph, is always padded: fixed shapes). These
  land in `values["shapes"]`. The search's baseline (eager fp32, no buckets) comes back unchanged, so
  `values == baseline values` identifies it; no label is compared.
- `label(values)`: a suffix for the trial's label ("" when there is nothing to add).
- `evaluator(final=..., measure_s=..., prune_above=...)`: the function a trial worker runs and
  its own keyword arguments (picklable); the loop adds device, tolerance and warmup_s.
- `final_reserve(tops, process_s=)`: seconds the final re-measurement of the trials `tops` needs (`process_s`: one process start, paid per candidate where each gets its own), beyond
  starting its process.
- `final_measure(workload, candidates, *, device, tolerance, warmup_s, env, timeout, log_path)`:
  the final re-measurement of the top candidates against the baseline, in `evaluate`'s result
  format: each variant alone in its own process, windows taken in turns (`evaluate_alternating`);
  a window times one shape, or whole rounds of the traffic mix (`traffic_eval.TrafficBench`).
- `record(plan, values, result)`: write the chosen configuration into the plan (`plan.shapes`).

`values_from_plan(plan)` inverts `record`, and `shape_tuning_for_plan(plan, ...)` gives the hooks
back, so `verify` re-measures a plan with the tune's `final_measure`: a traffic plan over its mix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

from ...engine import limits
from ...engine.bench import Bench
from ...engine.fidelity import BASELINE_PROCESSES, FINAL_ROUNDS, FINAL_WINDOW_S, MIN_ROUNDS, final_rounds_s
from ...engines import fixed_shape_backends
from ...errors import UserInputError
from ...knobs import SearchContext, all_knobs, configs_from_params, get_knob
from ...knobs.base import knob_for_config
from .buckets import ALIGN, BATCH, BucketSpec, ShapePlan, infer_axes, quantile_edges, spec_from_values
from .static import AlternatingFinal, StaticShapes
from .traffic import Shape, dim_names, histogram, parse_traffic, traffic_to_rows, workload_traffic

# Bucket counts Optuna may pick per dim; capped by the distinct sizes seen and `max_buckets`.
BUCKET_COUNTS = (1, 2, 3, 4, 6)
MAX_BUCKETS = 12
# Unseen in-range shapes whose accuracy is checked too (between the traffic's sizes).
N_UNSEEN = 2
FINAL_WARMUP_S = limits.MAX_WARMUP_S  # the longest warm-up of a variant in a final re-measurement (its process)
FINAL_PROCESS_S = 0.5  # a final process's own start, reference and warm-up (convnet's baseline: 0.5 s here)
# Buckets above this traffic quantile of the request size may run their own backend/precision.
SPLIT_QUANTILES = (0.5, 0.75, 0.9)


class ShapeTuning(AlternatingFinal):
    """Tune for a traffic mix instead of one shape; see the module doc for the hooks."""

    def __init__(self, workload, traffic: list[Shape], *, p99_ms: float | None = None,
                 max_buckets: int = MAX_BUCKETS, rounds: int = 10, final_rounds: int = 20,
                 serve_batches: list[int] | None = None, strategy: Any = None,
                 final_measure_s: float | None = None) -> None:
        self.workload, self.traffic, self.p99_ms, self.strategy = workload, traffic, p99_ms, strategy
        # the final's windows: `final_measure_s` in all, and `final_rounds` rounds of the mix per variant
        self.final_measure_s = final_measure_s or float(getattr(strategy, "final_measure_s", 6.0))
        # Throughput objective: the serving batch sizes searched (None: latency objective).
        self.serve_batches = serve_batches
        self.max_buckets, self.rounds, self.final_rounds = max_buckets, rounds, final_rounds
        self.names = dim_names(traffic)
        probe = {n: max(2, min(histogram(traffic, n))) for n in self.names}
        self.axes = workload.in_child(infer_axes, self.names, probe, stage="example_inputs() at the traffic's sizes")
        self.hist = {n: histogram(traffic, n) for n in self.names}
        # Without pad_inputs only the batch can be padded, and a graph specialised on the batch
        # would still see every size of the other dims: such workloads get shared runners only.
        self.can_pad = len(self.names) == 1 or workload.hook_defined("pad_inputs")
        self._checked = False

    # -- search ---------------------------------------------------------------------------------
    def traffic_id(self) -> str:
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

    def _edges(self, trial, serve_batch: int | None) -> dict[str, list[int]]:
        edges: dict[str, list[int]] = {}
        budget = self.max_buckets
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
        return edges

    def bucket_choices(self, ctx: SearchContext | None) -> dict[str, list[str]]:
        """Per-bucket choices: backend -> the precision modes that work with it, from the
        strategy's space at this level and device. Empty when there is nothing to choose."""
        if ctx is None:
            return {}
        execution, precision = get_knob("execution"), get_knob("precision")
        space = getattr(self.strategy, "space", lambda name: {})
        out = {}
        for b in execution.choices("backend", space("execution"), ctx):
            if self.can_pad or b not in fixed_shape_backends():  # a fixed-shape session needs padding
                out[b] = [m for m in precision.choices("mode", space("precision"), ctx) if not any(  # any knob refuses
                    k.incompatible(configs_from_params({"execution": {"backend": b}, "precision": {"mode": m}}), ctx)
                    for k in all_knobs())]
        return out if sum(len(m) for m in out.values()) > 1 else {}

    def _size_quantile(self, q: float) -> int:
        """Input elements per request (product of the dims) at the traffic-weighted quantile q."""
        sizes = sorted((_elements({BATCH: t.batch_size, **t.dim_dict}), t.weight) for t in self.traffic)
        acc = 0.0
        for size, w in sizes:
            acc += w
            if acc >= q - 1e-12:
                return size
        return sizes[-1][0]

    def _bucket_knobs(self, trial, values: dict[str, dict], buckets: list[dict[str, int]],
                      ctx: SearchContext | None) -> list[dict]:
        """Each bucket's own backend and precision (overrides of `values`; {} when the same).

        Sampled as a split by request size, which a short budget can search (2 x buckets
        independent choices could not): buckets holding requests larger than the traffic's
        `split_at` quantile run `split_backend` with `split_precision`; the others the trial's
        knobs. Not while stage-1 seeds are still queued: a seed measures one whole-model config."""
        from optuna.trial import TrialState

        choices = self.bucket_choices(ctx)
        none = [{} for _ in buckets]
        if not choices or trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return none
        if trial.suggest_categorical("bucket_knobs", ["same", "split"]) == "same":
            return none
        backend = trial.suggest_categorical("split_backend", list(choices))
        modes = choices[backend]
        # One parameter per backend: Optuna needs the same choices under a name in every trial.
        mode = trial.suggest_categorical(f"split_{backend}_precision", modes) if len(modes) > 1 else modes[0]
        threshold = self._size_quantile(trial.suggest_categorical("split_at", SPLIT_QUANTILES))
        own = {}
        if backend != values.get("execution", {}).get("backend", "eager"):
            own["execution"] = dataclasses.asdict(get_knob("execution").config_cls(backend=backend))
        if mode != values.get("precision", {}).get("mode", "fp32"):
            own["precision"] = dataclasses.asdict(get_knob("precision").config_cls(mode=mode))
        return [dict(own) if _elements(edge) > threshold else {} for edge in buckets]

    def _padded(self, trial, runners: list[str]) -> list[bool]:
        """Which buckets pad to a specialised graph: eager never (padding would only add work),
        fixed-shape runners always (`FIXED_SHAPES`: an ONNX Runtime session, a captured CUDA
        graph), a compiling backend as Optuna picks. `runners`: see `_runner_kind`."""
        if not self.can_pad:
            return [False] * len(runners)
        if all(r in ("eager", FIXED_SHAPES) for r in runners):
            return [r == FIXED_SHAPES for r in runners]
        mode = trial.suggest_categorical("bucket_graphs", ["specialised", "dynamic", "per_bucket"])
        out = []
        for i, r in enumerate(runners):
            if r in ("eager", FIXED_SHAPES):
                out.append(r == FIXED_SHAPES)
            elif mode == "per_bucket":
                out.append(trial.suggest_categorical(f"bucket_{i}_specialised", [True, False]))
            else:
                out.append(mode == "specialised")
        return out

    def suggest(self, trial, values: dict[str, dict], ctx: SearchContext | None = None) -> dict[str, Any]:
        """Add `shapes` ({edges, padded, knobs, label[, serve_batch]}) to a trial's knob values;
        the baseline (eager fp32 on every shape as it comes) is returned unchanged."""
        if not self._checked:
            self._check_study(trial.study)
            self._checked = True
        serve_batch = trial.suggest_categorical("serve_batch", self.serve_batches) if self.serve_batches else None
        edges = self._edges(trial, serve_batch)
        own = self._bucket_knobs(trial, values, BucketSpec(edges=edges, axes=self.axes).buckets(), ctx)
        base = values.get("execution", {})
        padded = self._padded(trial, [_runner_kind(o.get("execution", base)) for o in own])
        if not any(padded) and not any(own):  # one shared runner serves every shape: edges only bound the range
            edges = {n: [serve_batch if n == BATCH and serve_batch else max(self.hist[n])] for n in self.names}
            padded, own = [False], [{}]
            if not serve_batch and values == _values(configs_from_params({})):
                return values  # that is the baseline itself
        shapes = {"edges": edges, "padded": padded, "knobs": own}
        spec = spec_from_values(shapes, self.axes)
        shapes["label"] = spec.label()
        if serve_batch:
            shapes.update(serve_batch=serve_batch, label=f"serve batch {serve_batch}, {spec.label()}")
        return {**values, "shapes": shapes}

    def label(self, values: dict[str, Any]) -> str:
        shapes = values.get("shapes")
        return f"; {shapes['label']}" if shapes else ""

    def final_reserve(self, tops: list, *, process_s: float = 0.0, least: bool = False) -> float:
        """Seconds the final re-measurement needs (`evaluate_alternating` with `bench`), as one
        shape's (`StaticShapes.final_reserve`) but over the mix: each of its processes (a
        candidate's, BASELINE_PROCESSES for the baseline), built one after another, also makes
        every shape's inputs and reference (a round of the mix) and warms up over at least 3
        rounds, a candidate checks every shape (unseen too) and its padding (two rounds) and
        rebuilds its buckets in full (ONNX exports and traces are not cached); then windows of
        at least `min_rounds` rounds each. A round is the traffic's calls at the slower of the
        trial's weighted mean latencies (per sample when throughput: times the largest batch).
        `least`: one baseline process and MIN_ROUNDS windows, what the final cannot do without."""
        mean_ms = max((max(float(t.user_attrs.get("baseline_ms") or 0.0), float(t.user_attrs.get("latency_ms") or 0.0))
                       for t in tops), default=0.0)
        batch = max([*(self.serve_batches or []), max(self.hist[BATCH])]) if self.serve_batches else 1
        round_s = len(self.traffic) * batch * mean_ms / 1e3
        warm = max(3 * round_s, min(FINAL_WARMUP_S, 6 * round_s))
        processes = len(tops) + (1 if least else BASELINE_PROCESSES)
        rebuild = sum(float(t.user_attrs.get("build_s") or 0.0) + 2 * round_s for t in tops)
        window = max(FINAL_WINDOW_S, self.bench_rounds() * round_s)
        return (rebuild + processes * (max(FINAL_PROCESS_S, process_s / 2) + round_s + warm)
                + final_rounds_s(len(tops), self.final_measure_s, window, rounds=MIN_ROUNDS if least else None))

    def final_costs(self, costs: dict[str, limits.Cost] | None) -> dict[str, limits.Cost] | None:
        return None  # a window is whole rounds of the mix: every step gets the final's own limit

    def bench_rounds(self) -> int:
        """Rounds of the mix per window of the final: `final_rounds` per variant over `FINAL_ROUNDS` windows."""
        return math.ceil(self.final_rounds / FINAL_ROUNDS)

    def bench(self, candidates: dict[str, dict]) -> Bench | None:
        """What the final's windows time (`final_measure`): whole rounds of the mix, at least
        `final_rounds` per variant over `FINAL_ROUNDS` windows; unseen shapes checked for accuracy;
        per sample when a candidate serves full batches (throughput)."""
        from .traffic_eval import TrafficBench, serve_batch_of

        return TrafficBench(traffic=traffic_to_rows(self.traffic), axes=self.spec_axes(),
                            check_shapes=self.unseen_shapes(), p99_ms=self.p99_ms,
                            per_sample=any(serve_batch_of(v) for v in candidates.values()),
                            min_rounds=self.bench_rounds())

    def evaluator(self, *, final: bool = False, measure_s: float = 2.0,
                  prune_above: float | None = None) -> tuple[Callable, dict[str, Any]]:
        """`evaluate_traffic` and its arguments. Every shape gets the same number of rounds (a
        round of the mix is one sample), so neither a time window nor a quick-look pruning applies.
        (`final=True`: the final's rounds and unseen shapes, in one process; the tune's final
        itself is `final_measure`, in alternating processes.)"""
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
        """Store the chosen buckets, their configs and the traffic figures in `plan.shapes`
        (None when the plan keeps the baseline: eager serves every shape as it comes)."""
        if not values or "shapes" not in values:
            plan.shapes = None
            return
        sh = values["shapes"]
        spec = spec_from_values(sh, self.axes)
        measured = {k: result[k] for k in ShapePlan.FIGURES if result and k in result}
        plan.shapes = ShapePlan(spec, traffic=traffic_to_rows(self.traffic), serve_batch=sh.get("serve_batch"),
                                p99_budget_ms=self.p99_ms, label=sh["label"], measured=measured)


FIXED_SHAPES = "fixed shapes"  # a runner that serves one input shape: its buckets are always padded


def _runner_kind(execution: dict[str, Any]) -> str:
    """A bucket's execution values as `_padded` sees them: its backend, or `FIXED_SHAPES` for an
    engine's runner (built at one shape: ONNX Runtime, OpenVINO) or a CUDA graph (captured per input
    shape: padding keeps it to one graph per bucket instead of one per request shape, up to its limit)."""
    if execution.get("backend") in fixed_shape_backends() or execution.get("cuda_graphs"):
        return FIXED_SHAPES
    return execution.get("backend", "eager")


def _elements(sizes: dict[str, int]) -> int:
    return math.prod(sizes.values())


def _values(configs) -> dict[str, dict]:
    return {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}


def values_from_plan(plan) -> dict[str, Any]:
    """The trial values that `record` turned into `plan`: what `verify` evaluates again."""
    values = _values(plan.knobs)
    sh = plan.shapes
    if sh is None:
        return values
    own = [{knob_for_config(c).name: dataclasses.asdict(c) for c in k.values()} for k in sh.spec.knobs]
    shapes = {"edges": sh.spec.edges, "padded": sh.spec.padded, "knobs": own, "label": sh.label}
    if sh.serve_batch:
        shapes["serve_batch"] = sh.serve_batch
    return {**values, "shapes": shapes}


def shape_tuning_for_plan(plan, workload, *, measure_s: float = 6.0, rounds: int = 20) -> StaticShapes | ShapeTuning:
    """The hooks that re-measure `plan` as it was tuned: `measure_s` of windows at one shape, or
    over its recorded traffic mix (windows of whole rounds, `rounds` per variant at least)."""
    sh = plan.shapes
    if sh is None:
        return StaticShapes(final_measure_s=measure_s)
    traffic = parse_traffic(sh.traffic, origin="plan `shapes.traffic`") if sh.traffic else None
    if traffic is None:
        raise UserInputError("the plan's `shapes` has no `traffic`: it cannot be re-measured over its mix; "
                             "re-run `autotiacc tune` with the traffic.")
    return ShapeTuning(workload, traffic, p99_ms=sh.p99_budget_ms, rounds=rounds, final_rounds=rounds,
                       serve_batches=[sh.serve_batch] if sh.serve_batch else None, final_measure_s=measure_s)


def shape_tuning_for(workload, *, traffic_file: str | Path | None = None, p99_ms: float | None = None,
                     strategy: Any = None) -> StaticShapes | ShapeTuning:
    """A ShapeTuning when the workload has traffic (`--traffic` or model.py `traffic()`), else
    StaticShapes: the hooks of the search loop either way (see the module doc). Both run on any
    device: the evaluators put the model and every input they make on the trial's device."""
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
        return StaticShapes(strategy)
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
                       serve_batches=serve, strategy=strategy)
