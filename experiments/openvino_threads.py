"""Does OpenVINO's own thread pool bias the search's ratio? The search times a candidate
interleaved with eager torch in one warm worker (A B A B ...); the final times each alone in its
own process, in turns. OpenVINO runs its inference on its own threads (TBB) beside torch's OpenMP
pool: if either keeps cores busy after a call returns, the other's next call is slowed and the
interleaved ratio lies. This script takes both figures for the same candidates, several times in
turns, with the same warm-up and harness as the tune:

- `search`: `inference.evaluate.evaluate` in a fresh worker (the tune's trial measurement), which
  also records the eager baseline's median *beside* that candidate;
- `final`: `engine.fidelity.measure_alternating` (eager and the candidate each alone in its own
  process, windows in turns), the figure a plan keeps.

ONNX Runtime (spinning off, as the tune builds it) and TorchScript are controls.

    python experiments/openvino_threads.py --model examples/convnet.py --batch-size 8 --reps 3

Prints a table and writes experiments/results/openvino/threads-<fingerprint id>-<time>.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from autotiacc.engine.fidelity import measure_alternating  # noqa: E402
from autotiacc.engine.workers import run_isolated  # noqa: E402
from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.inference.evaluate import evaluate  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402

VARIANTS = {"openvino f32": {"execution": {"backend": "openvino"}},
            "openvino f32 THROUGHPUT": {"execution": {"backend": "openvino"},
                                        "openvino": {"performance_hint": "THROUGHPUT"}},
            "onnxruntime": {"execution": {"backend": "onnxruntime"}},
            "torchscript": {"execution": {"backend": "torchscript"}}}


def search_figure(workload, values: dict, measure_s: float) -> dict:
    """One trial as the search takes it: a fresh worker, the candidate interleaved with eager."""
    out = run_isolated(evaluate, workload, {"c": values}, target_s=measure_s, warmup_s=1.0, timeout=300)
    if not out.ok:
        return {"error": out.reason()}
    res = out.value["candidates"]["c"]
    if "speedup" not in res:
        return {"error": res.get("reason", res["status"])}
    cand = statistics.median(res["timing"]["samples_ms"])
    return {"speedup": res["speedup"], "eager_ms": statistics.median(out.value["baseline"]["samples_ms"]),
            "cand_ms": cand}


def final_figure(workload, values: dict, rounds: int) -> dict:
    """The final's figure: eager and the candidate each alone in its own process, in turns."""
    res = measure_alternating(workload, {"c": values}, rounds=rounds, window_s=0.5, warmup_s=1.0)
    if "c" in res.failures:
        return {"error": res.failures["c"]}
    return {"speedup": res.speedup("c"), "eager_ms": res.median_ms("baseline"), "cand_ms": res.median_ms("c")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE.parent / "examples" / "convnet.py"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="search/final pairs per variant, taken in turns")
    ap.add_argument("--measure-s", type=float, default=2.0, help="the search's timing target (the strategy's measure_s)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the final's alternating windows")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    workload = load_workload(args.model, batch_size=args.batch_size)
    fp = fingerprint()
    rows = []
    for rep in range(args.reps):
        for name in args.variants:
            for how, fn in (("search", lambda: search_figure(workload, VARIANTS[name], args.measure_s)),
                            ("final", lambda: final_figure(workload, VARIANTS[name], args.rounds))):
                load = os.getloadavg()[0]
                fig = fn()
                rows.append({"rep": rep, "variant": name, "how": how, "load1": round(load, 2), **fig})
                print(rows[-1], flush=True)
    out = HERE / "results" / "openvino" / f"threads-{fingerprint_id(fp)}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["rep", "variant", "how", "load1", "speedup", "eager_ms", "cand_ms", "error"]
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"\n{fp['cpu_model']}, {fp['cpu_count']} cores, flags {' '.join(fp['cpu_flags'])}; load at start "
          f"{rows[0]['load1']}\n| variant | search speed-up (median of {args.reps}) | final speed-up | eager ms beside it "
          "in the search | eager ms alone |\n|---|---|---|---|---|")
    for name in args.variants:
        def med(how, key):
            vals = [r[key] for r in rows if r["variant"] == name and r["how"] == how and key in r]
            return f"{statistics.median(vals):.3g}" if vals else "failed"
        print(f"| {name} | {med('search', 'speedup')} | {med('final', 'speedup')} | {med('search', 'eager_ms')} | "
              f"{med('final', 'eager_ms')} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
