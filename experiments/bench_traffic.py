"""Check a traffic-tuned plan as production would use it: `load_plan(...).apply(model)` in a
fresh process (no tuning here), then, in this one process:
  1. accuracy on every traffic shape and on unseen in-range shapes (default: batch 3, length 53),
     plan output vs unpadded fp32 eager;
  2. an out-of-range shape runs (unoptimized) with one warning;
  3. each traffic shape timed interleaved with eager (measure.measure_interleaved), the same
     rounds for every shape; traffic-weighted mean latency and its ratio, p99 over the mix.
Absolute figures move 20-40 % on shared machines; the ratio is the figure to read.

    python experiments/bench_traffic.py examples/text_encoder_traffic.py runs/x/plan.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from autotiacc.inference.shapes.buckets import bucket_key, own_label
from autotiacc.inference.plan import load_plan
from autotiacc.inference.shapes.traffic import workload_traffic
from autotiacc.inference.shapes.traffic_eval import mixture_quantile
from autotiacc.inference.workload import load_workload
from autotiacc.measure import measure_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_py")
    ap.add_argument("plan")
    ap.add_argument("--traffic", default=None, help="CSV/JSON traffic (default: the model file's traffic())")
    ap.add_argument("--unseen", default="3x53", help="in-range shapes never in the traffic, BxL[,BxL]")
    ap.add_argument("--out-of-range", default="6x100", help="a shape beyond every bucket, BxL")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tolerance", type=float, default=None, help="max relative L2 error (default: the plan's)")
    args = ap.parse_args()

    w = load_workload(args.model_py)
    traffic = workload_traffic(w, args.traffic)
    dim = [n for n, _ in traffic[0].dims][0] if traffic[0].dims else None
    plan = load_plan(args.plan)
    tol = args.tolerance or plan.tolerance or 2e-2
    model = w.build_model()
    t0 = time.perf_counter()
    fast = plan.apply(model, pad_inputs=w.user_hook("pad_inputs"))
    if hasattr(fast, "prepare"):
        fast.prepare(lambda b, **d: w.example_inputs(b, **d))
    build_s = time.perf_counter() - t0

    def shape_inputs(b: int, length: int | None, seed: int = 1):
        return w.example_inputs(b, seed=seed, **({dim: length} if dim else {}))

    def rel_err(x) -> float:
        with torch.inference_mode():
            ref = model(*x)
        out = fast(*x)
        return float((out.double() - ref.double()).norm() / ref.double().norm())

    worst = max(rel_err(shape_inputs(s.batch_size, s.dim_dict.get(dim))) for s in traffic)
    unseen = {u: rel_err(shape_inputs(*map(int, u.split("x")))) for u in args.unseen.split(",")}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        b, length = map(int, args.out_of_range.split("x"))
        for _ in range(2):
            oor_err = rel_err(shape_inputs(b, length))
    oor_warnings = [str(r.message) for r in rec if "outside every tuned bucket" in str(r.message)]

    per_shape = {}
    for s in traffic:
        x = shape_inputs(s.batch_size, s.dim_dict.get(dim))

        def eager(x=x):
            with torch.no_grad():
                return model(*x)

        per_shape[s.key()] = measure_interleaved({"eager": eager, "plan": lambda x=x: fast(*x)},
                                                 min_rounds=args.rounds, max_rounds=args.rounds, warmup_s=0.5)
    weights = {s.key(): s.weight for s in traffic}
    spec = plan.shapes.spec if plan.shapes else None
    mix = {n: [sum(weights[k] * t[n].samples_ms[r] for k, t in per_shape.items()) for r in range(args.rounds)]
           for n in ("eager", "plan")}
    med = {n: statistics.median(v) for n, v in mix.items()}
    p99 = {n: mixture_quantile({k: t[n].samples_ms for k, t in per_shape.items()}, weights, 0.99)
           for n in ("eager", "plan")}
    result = {
        "plan": plan.label,
        "buckets": [{"bucket": bucket_key(edge), "padded": p, "knobs": own_label(own) or "plan's"}
                    for edge, p, own in zip(spec.buckets(), spec.padded, spec.knobs)] if spec else None,
        "build_s": round(build_s, 2), "traffic_shapes": len(traffic),
        "weighted_latency_ms": {n: round(v, 3) for n, v in med.items()},
        "speedup_traffic_weighted": round(med["eager"] / med["plan"], 3),
        "p99_mix_ms": {n: round(v, 3) for n, v in p99.items()},
        "worst_rel_error_traffic": worst, "rel_error_unseen": unseen, "tolerance": tol,
        "out_of_range": {"shape": args.out_of_range, "rel_error": oor_err, "warnings": len(oor_warnings)},
        "accuracy_ok": worst <= tol and all(e <= tol for e in unseen.values()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
