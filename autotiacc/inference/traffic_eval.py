"""What runs inside an isolated trial process when the workload has traffic: build each
candidate as a `BucketedModel`, check accuracy on every traffic shape (padded vs unpadded
eager), then time candidate and eager baseline interleaved on every shape of the mix.

The objective is the traffic-weighted mean latency. Every shape is timed for the same number
of rounds, so round r of the mix is one sample Σ_s w_s·t_s,r of the weighted latency: the
returned Timings are of that, and `faster_beyond_noise` applies to them unchanged. p99 over
the mix is the weighted 99th percentile of all per-call samples.
"""
from __future__ import annotations

import math
import time
import traceback
from typing import Any

from ..device import is_meta, to_device, use_device
from ..knobs import configs_from_params
from ..measure import Timing, measure_interleaved
from .accuracy import compare_outputs
from .buckets import BATCH, BucketedModel, BucketSpec, bucket_key, own_label, spec_from_values
from .candidate import compile_stats
from .evaluate import BASELINE, worker_cached, workload_key
from .traffic import Shape, parse_traffic

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
    import torch

    use_device(device)  # cuda:N is this process's current device (events, streams, graphs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    shapes = parse_traffic(traffic)
    extra = parse_traffic(check_shapes) if check_shapes else []
    # built once per worker for this workload, mix and device; trial after trial reuses it
    key = ("traffic", workload_key(workload), device, repr(traffic), repr(check_shapes))
    model, inputs, refs = worker_cached(key, lambda: _reference(workload, device, shapes + extra))
    pad = workload.user_hook("pad_inputs")
    unpad = workload.user_hook("unpad_outputs")

    results: dict[str, Any] = {}
    built: dict[str, BucketedModel] = {}
    for name, values in candidates.items():
        res: dict[str, Any] = {"knobs": values}
        try:
            torch._dynamo.utils.counters.clear()
            spec = spec_from_values(values.get("shapes") or _whole_range(shapes), axes)
            cand = BucketedModel(model, configs_from_params(values), spec, device=device, pad_inputs=pad,
                                 unpad_outputs=unpad)
            t0 = time.perf_counter()
            build = cand.prepare(lambda b, **d: _inputs_on(workload, device, b, **d))
            res["build_s"] = time.perf_counter() - t0
            outs = {k: cand(*x) for k, x in inputs.items()}
            res["compile"] = compile_stats()
            res["buckets"] = _bucket_rows(spec, shapes, build)
            if is_meta(device):  # shape-only dry run: placement and shapes are checked, accuracy is not
                res.update(status="ok", note="meta device: shape-only dry run, accuracy not checked")
                built[name] = cand
                results[name] = res
                continue
            keys = list(inputs)
            acc = compare_outputs([outs[k] for k in keys], [refs[k] for k in keys], tolerance=tolerance)
            res["accuracy"] = acc.to_dict()
            if not acc.ok:
                res.update(status="rejected", reason=acc.reason.replace(
                    f"test batch {acc.worst_batch}", f"shape {keys[acc.worst_batch]}"))
            else:
                res["status"] = "ok"
                built[name] = cand
        except Exception as exc:  # noqa: BLE001 - a candidate failing is a result, not a crash
            res.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                       traceback=traceback.format_exc()[-4000:])
        results[name] = res

    t0 = time.perf_counter()
    weights = {s.key(): s.weight for s in shapes}
    names = [BASELINE] + list(built)
    per_shape: dict[str, dict[str, Timing]] = {n: {} for n in names}
    waste = {n: 0.0 for n in built}
    # Throughput objective: a candidate with `serve_batch` B serves full batches of B requests;
    # figures become ms per sample (the baseline serves the traffic's own batch sizes).
    serve = {n: (candidates[n].get("shapes") or {}).get("serve_batch") for n in built}
    per_sample = any(serve.values())
    for s in shapes:
        x = inputs[s.key()]

        def baseline(x=x) -> Any:
            with torch.inference_mode():
                return model(*x)

        xs = {n: (_inputs_on(workload, device, serve[n], **s.dim_dict) if serve[n] else x) for n in built}
        runners = {BASELINE: baseline, **{n: (lambda c=c, x=xs[n]: c(*x)) for n, c in built.items()}}
        for n, c in built.items():
            c.padding.update(real=0, fed=0)
            c(*xs[n])
            waste[n] += s.weight * c.padding_waste()
        # Warm-up is per shape here, so cap it: dozens of shapes x the single-shape allowance would
        # eat the budget; compilation already happened in prepare().
        timings = measure_interleaved(runners, device, min_rounds=rounds, max_rounds=rounds,
                                      warmup_s=min(warmup_s, SHAPE_WARMUP_S))
        for n, t in timings.items():
            per_shape[n][s.key()] = t
    batch = {s.key(): s.batch_size for s in shapes}
    divisor = {n: (lambda k, n=n: (serve.get(n) or batch[k]) if per_sample else 1) for n in names}
    mixed = {n: Timing([sum(weights[k] * t.samples_ms[r] / divisor[n](k) for k, t in per_shape[n].items())
                        for r in range(rounds)]) for n in names}
    p99 = {n: mixture_quantile({k: t.samples_ms for k, t in per_shape[n].items()}, weights, 0.99) for n in names}
    base = mixed[BASELINE]
    for n in built:
        r = mixed[n].median / base.median
        res = results[n]
        if per_sample:
            res["samples_per_s"] = 1e3 / mixed[n].median
        res.update(timing=mixed[n].to_dict(), ratio=r, speedup=1 / r, p99_mix_ms=p99[n], padding_waste=waste[n],
                   per_shape={k: {"median_ms": t.median, "baseline_ms": per_shape[BASELINE][k].median,
                                  "weight": weights[k]} for k, t in per_shape[n].items()})
        for row in res["buckets"]:
            covered = [k for k in row["shape_keys"]]
            share = sum(weights[k] for k in covered)
            row["latency_ms"] = (sum(weights[k] * per_shape[n][k].median for k in covered) / share) if share else None
            row["baseline_ms"] = (sum(weights[k] * per_shape[BASELINE][k].median for k in covered) / share) if share else None
        # (the timing's duration is the result's `measure_s`, which the task records for every trial)
        res["trial_attrs"] = {"p99_mix_ms": p99[n], "padding_waste": waste[n],
                              "bucket_set": (res["knobs"].get("shapes") or {}).get("label", "one shared runner")}
        if p99_ms is not None and p99[n] > p99_ms:
            res.update(status="rejected", reason=f"p99 over the traffic mix {p99[n]:.2f} ms exceeds --p99-ms {p99_ms:g}")
    return {"baseline": base.to_dict(), "candidates": results, "baseline_p99_mix_ms": p99[BASELINE],
            "per_sample": per_sample,
            "measure_s": time.perf_counter() - t0}


def _reference(workload, device: str, shapes: list[Shape]) -> tuple[Any, dict[str, tuple], dict[str, Any]]:
    """The eager fp32 model on `device`, every shape's inputs (made there) and its outputs."""
    import torch

    # a module is a pytree leaf: to_device moves it too; every input below is made on `device`
    model = to_device(workload.build_model(), device)
    inputs = {s.key(): _inputs_on(workload, device, s.batch_size, seed=0, **s.dim_dict) for s in shapes}
    with torch.inference_mode():
        refs = {k: model(*x) for k, x in inputs.items()}
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
