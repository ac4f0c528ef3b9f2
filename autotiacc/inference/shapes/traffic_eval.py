"""What runs inside an isolated trial process when the workload has traffic: build each
candidate as a `BucketedModel`, check accuracy on every traffic shape (padded vs unpadded
eager), then time candidate and eager baseline interleaved on every shape of the mix.

The objective is the traffic-weighted mean latency. Every shape is timed for the same number
of rounds, so round r of the mix is one sample Σ_s w_s·t_s,r of the weighted latency: the
returned Timings are of that, and `faster_beyond_noise` applies to them unchanged. p99 over
the mix is the weighted 99th percentile of all per-call samples.

That is how a trial compares its candidate with the baseline, interleaved in one worker. The
final re-measurement (and `verify`) takes the same figures with `TrafficBench`: each variant
alone in its own process, windows of whole rounds of the mix taken in turns
(`engine.fidelity.evaluate_alternating`).
"""
from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from ...device import is_meta, to_device, use_device
from ...engine.bench import Bench
from ...engine.fidelity import AlternatingResult
from ...knobs import configs_from_params
from ...machine_load import LoadProbe
from ...measure import Timing, measure_interleaved
from ..accuracy import compare_outputs
from ..baseline import EagerBaseline, eager_call
from ..candidate import compile_stats
from ..evaluate import BASELINE, worker_cached, workload_key
from .bucketed import BucketedModel
from .buckets import BATCH, BucketSpec, bucket_key, own_label, spec_from_values
from .traffic import Shape, parse_traffic
from ...torch_compat import clear_dynamo_counters, dynamo_reset

SHAPE_WARMUP_S = 0.5  # warm-up allowance per runner and shape


def mixture_quantile(samples: dict[str, list[float]], weights: dict[str, float], q: float) -> float:
    """Quantile `q` of the per-call latency when shapes arrive with `weights`."""
    pts = sorted((x, weights[k] / len(v)) for k, v in samples.items() for x in v if v)
    total = sum(w for _, w in pts)
    acc = 0.0
    for x, w in pts:
        acc += w
        if acc >= q * total - 1e-12:
            return x
    return pts[-1][0] if pts else math.nan


def _inputs_on(workload, device: str, batch_size: int, **dims: int) -> tuple:
    """example_inputs at one shape, on `device` (the model is there too: see `evaluate_traffic`)."""
    return to_device(workload.example_inputs(batch_size, **dims), device)


def _whole_range(shapes: list[Shape]) -> dict[str, Any]:
    """One unpadded bucket up to the largest size of each dim: every shape as it comes."""
    edges = {BATCH: [max(s.batch_size for s in shapes)]}
    edges.update({n: [max(s.dim_dict[n] for s in shapes)] for n, _ in shapes[0].dims})
    return {"edges": edges, "padded": [False]}


def evaluate_traffic(workload, candidates: dict[str, dict[str, Any]], *, traffic: list[dict], axes: dict,
                     device: str = "cpu", tolerance: float = 2e-2, rounds: int = 10, warmup_s: float = 0.5,
                     p99_ms: float | None = None, check_shapes: list[dict] | None = None) -> dict[str, Any]:
    """Like `evaluate.evaluate`, over a traffic mix. Each candidate's values hold the knobs and
    `shapes` ({"edges", "padded", "knobs"}: see `buckets.spec_from_values`; without it, the
    knobs serve every shape as it comes). Every shape gets `rounds` rounds, the same for all, so
    that a round of the mix is one sample. `check_shapes` are extra (unseen) shapes checked for
    accuracy only. The model and every input made here (traffic shapes, bucket builds, serving
    batches) are on `device`; on `meta` it is a shape-only dry run, as in `evaluate`."""

    use_device(device)  # cuda:N is this process's current device (events, streams, graphs)
    dynamo_reset()
    shapes = parse_traffic(traffic)
    extra = parse_traffic(check_shapes) if check_shapes else []
    # built once per worker for this workload, mix and device; trial after trial reuses it
    key = ("traffic", workload_key(workload), device, repr(traffic), repr(check_shapes))
    model, inputs, refs = worker_cached(key, lambda: _reference(workload, device, shapes + extra))

    results, built = _build_all(workload, model, candidates, shapes, axes, device=device, inputs=inputs, refs=refs,
                                tolerance=tolerance)
    t0 = time.perf_counter()
    weights = {s.key(): s.weight for s in shapes}
    names = [BASELINE] + list(built)
    # Throughput objective: a candidate with `serve_batch` B serves full batches of B requests;
    # figures become ms per sample (the baseline serves the traffic's own batch sizes).
    serve = {n: serve_batch_of(candidates[n]) for n in built}
    per_sample = any(serve.values())
    xs = {n: serving_inputs(workload, device, serve[n], shapes, inputs) for n in built}
    waste = {n: padding_waste(c, xs[n], weights) for n, c in built.items()}
    per_shape, load = _time_shapes(model, built, shapes, inputs, xs, device=device, rounds=rounds, warmup_s=warmup_s)
    divisor = {n: divisors(shapes, serve.get(n), per_sample) for n in names}
    mixed = {n: Timing([sum(weights[k] * t.samples_ms[r] / divisor[n][k] for k, t in per_shape[n].items())
                        for r in range(rounds)], load=load) for n in names}
    samples = {n: {k: t.samples_ms for k, t in per_shape[n].items()} for n in names}
    base = mixed[BASELINE]
    for n in built:
        r = mixed[n].median / base.median
        res = results[n]
        if per_sample:
            res["samples_per_s"] = 1e3 / mixed[n].median
        res.update(timing=mixed[n].to_dict(), ratio=r, speedup=1 / r, padding_waste=waste[n])
        res.update(mix_figures(samples[n], samples[BASELINE], weights, buckets=res["buckets"], p99_ms=p99_ms))
        # (the timing's duration is the result's `measure_s`, which the task records for every trial)
        res["trial_attrs"] = {"p99_mix_ms": res["p99_mix_ms"], "padding_waste": waste[n],
                              "bucket_set": (res["knobs"].get("shapes") or {}).get("label", "one shared runner")}
    return {"baseline": base.to_dict(), "candidates": results,
            "baseline_p99_mix_ms": mixture_quantile(samples[BASELINE], weights, 0.99), "per_sample": per_sample,
            "measure_s": time.perf_counter() - t0}


def _build_all(workload, model, candidates: dict[str, dict[str, Any]], shapes: list[Shape], axes: dict, *,
               device: str, inputs: dict[str, tuple], refs: dict[str, Any],
               tolerance: float) -> tuple[dict[str, Any], dict[str, BucketedModel]]:
    """Each candidate built and checked on every shape: (its result so far, by name; those that
    passed, built)."""
    results: dict[str, Any] = {}
    built: dict[str, BucketedModel] = {}
    for name, values in candidates.items():
        try:
            cand, res = build_candidate(workload, model, values, shapes, axes, device=device, inputs=inputs,
                                        refs=refs, tolerance=tolerance)
            if res["status"] == "ok":
                built[name] = cand
        except Exception as exc:  # noqa: BLE001 - a candidate failing is a result, not a crash
            res = {"knobs": values, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                   "traceback": traceback.format_exc()[-4000:]}
        results[name] = res
    return results, built


def _time_shapes(model, built: dict[str, BucketedModel], shapes: list[Shape], inputs: dict[str, tuple],
                 xs: dict[str, dict[str, tuple]], *, device: str, rounds: int,
                 warmup_s: float) -> tuple[dict[str, dict[str, Timing]], dict[str, Any] | None]:
    """Every shape timed `rounds` rounds, eager and the candidates interleaved: ({variant: {shape:
    timing}}, the machine's load over all of it)."""
    per_shape: dict[str, dict[str, Timing]] = {n: {} for n in [BASELINE, *built]}
    with LoadProbe() as probe:
        for s in shapes:
            runners = {BASELINE: eager_runner(model, inputs[s.key()]),
                       **{n: (lambda c=c, x=xs[n][s.key()]: c(*x)) for n, c in built.items()}}
            # Warm-up is per shape here, so cap it: dozens of shapes x the single-shape allowance would
            # eat the budget; compilation already happened in prepare().
            timings = measure_interleaved(runners, device, min_rounds=rounds, max_rounds=rounds,
                                          warmup_s=min(warmup_s, SHAPE_WARMUP_S))
            for n, t in timings.items():
                per_shape[n][s.key()] = t
    return per_shape, probe.window.to_dict() if probe.window else None


# -- the parts both the trials' evaluation and the alternating final use ----------------------------
def build_candidate(workload, model, values: dict[str, Any], shapes: list[Shape], axes: dict, *, device: str,
                    inputs: dict[str, tuple], refs: dict[str, Any], tolerance: float) -> tuple[BucketedModel, dict]:
    """Build one candidate as a `BucketedModel` (every bucket now, as serving would) and check its
    outputs on every shape of `inputs` (traffic and unseen) against eager fp32's `refs`.
    Returns (the model, its result: status "ok" or "rejected" with the shape that failed,
    build_s, compile, buckets, accuracy). A build that raises is the caller's to catch."""

    clear_dynamo_counters()
    res: dict[str, Any] = {"knobs": values}
    spec = spec_from_values(values.get("shapes") or _whole_range(shapes), axes)
    cand = BucketedModel(model, configs_from_params(values), spec, device=device,
                         pad_inputs=workload.user_hook("pad_inputs"), unpad_outputs=workload.user_hook("unpad_outputs"))
    t0 = time.perf_counter()
    build = cand.prepare(lambda b, **d: _inputs_on(workload, device, b, **d))
    res["build_s"] = time.perf_counter() - t0
    outs = {k: cand(*x) for k, x in inputs.items()}
    res["compile"] = compile_stats()
    res["buckets"] = _bucket_rows(spec, shapes, build)
    if is_meta(device):  # shape-only dry run: placement and shapes are checked, accuracy is not
        res.update(status="ok", note="meta device: shape-only dry run, accuracy not checked")
        return cand, res
    keys = list(inputs)
    acc = compare_outputs([outs[k] for k in keys], [refs[k] for k in keys], tolerance=tolerance)
    res["accuracy"] = acc.to_dict()
    if not acc.ok:
        res.update(status="rejected", reason=acc.reason.replace(f"test batch {acc.worst_batch}",
                                                                f"shape {keys[acc.worst_batch]}"))
    else:
        res["status"] = "ok"
    return cand, res


def serve_batch_of(values: dict[str, Any]) -> int | None:
    """The serving batch size of a throughput candidate (None: requests as they come)."""
    return (values.get("shapes") or {}).get("serve_batch")


def serving_inputs(workload, device: str, serve: int | None, shapes: list[Shape],
                   inputs: dict[str, tuple]) -> dict[str, tuple]:
    """What a variant is fed per traffic shape: the request itself, or a full batch of `serve`."""
    return {s.key(): _inputs_on(workload, device, serve, **s.dim_dict) if serve else inputs[s.key()] for s in shapes}


def divisors(shapes: list[Shape], serve: int | None, per_sample: bool) -> dict[str, int]:
    """What a call's time is divided by in the mix figure: 1, or (throughput) the samples it serves."""
    return {s.key(): (serve or s.batch_size) if per_sample else 1 for s in shapes}


def eager_runner(model, x: tuple) -> Callable[[], Any]:
    """The eager fp32 baseline on one shape, as the user runs it (`baseline.EagerBaseline`)."""
    return EagerBaseline(model, x)


def padding_waste(cand: BucketedModel, xs: dict[str, tuple], weights: dict[str, float]) -> float:
    """Traffic-weighted share of the input elements fed to `cand` that are padding: one call per shape."""
    waste = 0.0
    for k, x in xs.items():
        cand.padding.update(real=0, fed=0)
        cand(*x)
        waste += weights[k] * cand.padding_waste()
    return waste


def mix_figures(samples: dict[str, list[float]], baseline: dict[str, list[float]], weights: dict[str, float], *,
                buckets: list[dict], p99_ms: float | None) -> dict[str, Any]:
    """A candidate's figures over the mix from its per-call samples by shape and the baseline's:
    p99 over the mix, per-shape medians, each bucket's traffic-weighted latency; rejected when
    its p99 exceeds `p99_ms`."""
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = {k: statistics.median(v) for k, v in baseline.items()}
    rows = []
    for row in buckets:
        share = sum(weights[k] for k in row["shape_keys"])
        rows.append({**row, "latency_ms": sum(weights[k] * med[k] for k in row["shape_keys"]) / share if share else None,
                     "baseline_ms": sum(weights[k] * base[k] for k in row["shape_keys"]) / share if share else None})
    p99 = mixture_quantile(samples, weights, 0.99)
    out: dict[str, Any] = {"p99_mix_ms": p99, "buckets": rows,
                           "per_shape": {k: {"median_ms": med[k], "baseline_ms": base[k], "weight": weights[k]}
                                         for k in samples}}
    if p99_ms is not None and p99 > p99_ms:
        out.update(status="rejected", reason=f"p99 over the traffic mix {p99:.2f} ms exceeds --p99-ms {p99_ms:g}")
    return out


@dataclass
class TrafficBench(Bench):
    """The bench of a traffic tune's final re-measurement and of `verify` over a mix (see
    `engine.fidelity`): each variant's process builds the eager fp32 model and every shape's
    inputs, a candidate as a `BucketedModel` checked on every shape (`check_shapes`, unseen, too).
    A window is whole rounds of the mix (at least `min_rounds`, for `window_s`), each round one
    traffic-weighted figure Σ_s w_s·t_s (per sample with `per_sample`: throughput), as in
    `evaluate_traffic`; the window's figure is their median. In the parent, `figures` gives the
    per-shape medians, the p99 over the mix (rejecting past `p99_ms`) and each bucket's latency
    from the calls of all the windows."""

    traffic: list[dict]
    axes: dict
    check_shapes: list[dict] | None = None
    p99_ms: float | None = None
    per_sample: bool = False
    min_rounds: int = 1

    @property
    def describe(self) -> str:
        return (f"rounds of the {len(self.traffic)}-shape traffic mix, traffic-weighted"
                + (" per sample" if self.per_sample else ""))

    def weights(self) -> dict[str, float]:
        return {s.key(): s.weight for s in parse_traffic(self.traffic)}

    # -- in the variant's process ---------------------------------------------------------------
    def build(self, workload, values: dict | None, *, device: str, tolerance: float) -> tuple[_Mix, dict[str, Any]]:
        """The variant's runners over the mix (None: the eager fp32 baseline) and what the build
        reports; raises when the candidate fails (its accuracy on any shape included)."""

        use_device(device)
        dynamo_reset()
        shapes = parse_traffic(self.traffic)
        extra = parse_traffic(self.check_shapes) if self.check_shapes and values is not None else []
        model, inputs, refs = _reference(workload, device, shapes + extra)
        if values is None:
            return _Mix({s.key(): eager_runner(model, inputs[s.key()]) for s in shapes}, self.weights(),
                        divisors(shapes, None, self.per_sample)), {}
        cand, res = build_candidate(workload, model, values, shapes, self.axes, device=device, inputs=inputs,
                                    refs=refs, tolerance=tolerance)
        if res["status"] != "ok":
            raise ValueError(f"accuracy: {res['reason']}")
        serve = serve_batch_of(values)
        xs = serving_inputs(workload, device, serve, shapes, inputs)
        info = {k: res[k] for k in ("build_s", "compile", "buckets", "accuracy", "note") if k in res}
        info["padding_waste"] = padding_waste(cand, xs, self.weights())
        return _Mix({k: (lambda x=x: cand(*x)) for k, x in xs.items()}, self.weights(),
                    divisors(shapes, serve, self.per_sample)), info

    def window(self, mix: _Mix, *, device: str, window_s: float) -> dict[str, Any]:
        from ...measure import time_once

        parts: dict[str, list[float]] = {k: [] for k in mix.runners}
        rounds: list[float] = []
        t_end = time.perf_counter() + window_s
        while len(rounds) < self.min_rounds or time.perf_counter() < t_end:
            figure = 0.0
            for k, run in mix.runners.items():
                ms = time_once(run, device)
                parts[k].append(ms)
                figure += mix.weights[k] * ms / mix.divisor[k]
            rounds.append(figure)
        return {"samples_ms": rounds, "parts": parts}

    # -- in the parent ----------------------------------------------------------------------------
    def figures(self, result: AlternatingResult, name: str) -> dict[str, Any]:
        figs = mix_figures(result.parts[name], result.parts[BASELINE], self.weights(),
                           buckets=result.info.get(name, {}).get("buckets", []), p99_ms=self.p99_ms)
        if self.per_sample:
            figs["samples_per_s"] = 1e3 / result.median_ms(name)
        return figs

    def summary(self, result: AlternatingResult) -> dict[str, Any]:
        return {"baseline_p99_mix_ms": mixture_quantile(result.parts[BASELINE], self.weights(), 0.99),
                "per_sample": self.per_sample}


@dataclass
class _Mix:
    """One variant's runner per traffic shape, the shapes' weights and divisors; a call runs one
    round of the mix untimed (the warm-up)."""

    runners: dict[str, Callable[[], Any]]
    weights: dict[str, float]
    divisor: dict[str, int]

    def __call__(self) -> None:
        for run in self.runners.values():
            run()


def _reference(workload, device: str, shapes: list[Shape]) -> tuple[Any, dict[str, tuple], dict[str, Any]]:
    """The eager fp32 model on `device`, every shape's inputs (made there) and its outputs."""
    # a module is a pytree leaf: to_device moves it too; every input below is made on `device`
    model = to_device(workload.build_model(), device)
    inputs = {s.key(): _inputs_on(workload, device, s.batch_size, seed=0, **s.dim_dict) for s in shapes}
    refs = {k: eager_call(model, x) for k, x in inputs.items()}
    return model, inputs, refs


def _bucket_rows(spec: BucketSpec, shapes: list[Shape], build: dict[str, float]) -> list[dict[str, Any]]:
    """Per-bucket table rows: which traffic shapes it serves, their share, its own knobs, its
    build time (a shared runner's counts for the first bucket that used it)."""
    rows = []
    for idx, edge in enumerate(spec.buckets()):
        keys = [s.key() for s in shapes if spec.index({BATCH: s.batch_size, **s.dim_dict}) == idx]
        own = own_label(spec.knobs[idx])
        rows.append({"bucket": bucket_key(edge), "padded": spec.padded[idx], "shape_keys": keys, "knobs": own,
                     "traffic_share": sum(s.weight for s in shapes if s.key() in keys),
                     "build_s": build.get(bucket_key(edge))})
    return rows
