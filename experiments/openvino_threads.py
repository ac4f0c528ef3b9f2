"""Does OpenVINO's own thread pool bias the search's ratio? The search times a candidate
interleaved with eager torch in one warm worker (A B A B ...); the final times each alone in its
own process, in turns. OpenVINO runs its inference on its own threads (TBB) beside torch's OpenMP
pool: if either keeps cores busy after a call returns, the other's next call is slowed and the
interleaved ratio lies.

Direct check (default): in a fresh process per repetition, eager and the engine's runner are
called in the order E E O O E E O O ..., so each kind of call follows its own kind half the time
and the other kind half the time, interleaved (drift hits both alike). A pool that keeps cores
busy after its call shows as a slower call after the other kind than after its own. ONNX Runtime
with spinning intra-op threads (its default; the tune turns it off) is the positive control, and
with spinning off the negative one.

`--tune-figures` also takes the tune's own two figures for the same candidates, in turns:
`search` (`inference.evaluate.evaluate` in a fresh worker) and `final`
(`engine.fidelity.measure_alternating`: eager and the candidate each alone in its own process).

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

OPENVINO = {"execution": {"backend": "openvino"}}
# engines the direct check pairs with eager: (knob values to build with, ORT's spinning setting)
DIRECT = {"openvino f32": (OPENVINO, None), "openvino f32 THROUGHPUT":
          ({**OPENVINO, "openvino": {"performance_hint": "THROUGHPUT"}}, None),
          "onnxruntime, spinning on (its default)": ({"execution": {"backend": "onnxruntime"}}, "1"),
          "onnxruntime, spinning off (as tuned)": ({"execution": {"backend": "onnxruntime"}}, "0")}
TUNED = {"openvino f32": OPENVINO, "onnxruntime": {"execution": {"backend": "onnxruntime"}},
         "torchscript": {"execution": {"backend": "torchscript"}}}


def _engine_runner(workload, values: dict, spinning: str | None):
    """The candidate as the tune builds it; ORT rebuilt with `spinning` when given."""

    from autotiacc.inference.candidate import OptimizedModel
    from autotiacc.knobs import configs_from_params

    model, x = workload.build_model().eval(), workload.example_inputs()
    if spinning is None:
        cand = OptimizedModel(model, configs_from_params(values), example_inputs=x)
        return model, x, lambda: cand(*x)
    import onnxruntime as ort

    from autotiacc.engines.onnxruntime import export_onnx, runner
    import io

    buf = io.BytesIO()
    export_onnx(model, x, buf)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    run = runner(ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"]), "cpu")
    return model, x, lambda: run(*x)


def direct(workload, values: dict, spinning: str | None, calls: int) -> dict:
    """In this process: per-call ms of eager and the engine, each after its own kind and after the other."""
    import torch

    model, x, engine = _engine_runner(workload, values, spinning)
    fns = {"E": lambda: model(*x), "O": engine}
    with torch.inference_mode():
        for _ in range(5):
            fns["E"](), fns["O"]()
        ms: dict[str, list[float]] = {k: [] for k in ("E<E", "E<O", "O<O", "O<E")}
        prev = "O"
        for i in range(4 * calls):
            kind = "EEOO"[i % 4]
            t0 = time.perf_counter()
            fns[kind]()
            ms[f"{kind}<{prev}"].append((time.perf_counter() - t0) * 1e3)
            prev = kind
    return {k: statistics.median(v) for k, v in ms.items()}


def search_figure(workload, values: dict, measure_s: float) -> dict:
    """One trial as the search takes it: a fresh worker, the candidate interleaved with eager."""
    out = run_isolated(evaluate, workload, {"c": values}, target_s=measure_s, warmup_s=1.0, timeout=300)
    if not out.ok:
        return {"error": out.reason()}
    res = out.value["candidates"]["c"]
    if "speedup" not in res:
        return {"error": res.get("reason", res["status"])}
    return {"speedup": res["speedup"], "eager_ms": statistics.median(out.value["baseline"]["samples_ms"]),
            "cand_ms": statistics.median(res["timing"]["samples_ms"])}


def final_figure(workload, values: dict, rounds: int) -> dict:
    """The final's figure: eager and the candidate each alone in its own process, in turns."""
    res = measure_alternating(workload, {"c": values}, rounds=rounds, window_s=0.5, warmup_s=1.0)
    if "c" in res.failures:
        return {"error": res.failures["c"]}
    return {"speedup": res.speedup("c"), "eager_ms": res.median_ms("baseline"), "cand_ms": res.median_ms("c")}


KEYS = ["rep", "variant", "how", "load1", "E<E", "E<O", "O<O", "O<E", "speedup", "eager_ms", "cand_ms", "error"]


def _append(out: Path, row: dict) -> None:
    """One row more in the CSV (written as it comes: a run stopped early keeps what it measured)."""
    new = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=KEYS)
        if new:
            w.writeheader()
        w.writerow(row)


def _med(rows: list[dict], name: str, how: str, key: str) -> str:
    vals = [r[key] for r in rows if r["variant"] == name and r["how"] == how and key in r]
    return f"{statistics.median(vals):.3g}" if vals else "failed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE.parent / "examples" / "convnet.py"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per variant, taken in turns")
    ap.add_argument("--calls", type=int, default=50, help="calls of each kind after each kind, per process")
    ap.add_argument("--tune-figures", action="store_true", help="also the search's and the final's speed-ups")
    ap.add_argument("--measure-s", type=float, default=2.0, help="the search's timing target (strategy measure_s)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the final's alternating windows")
    args = ap.parse_args()
    workload = load_workload(args.model, batch_size=args.batch_size)
    fp = fingerprint()
    out = HERE / "results" / "openvino" / f"threads-{fingerprint_id(fp)}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    rows: list[dict] = []
    for rep in range(args.reps):
        for name, (values, spinning) in DIRECT.items():
            load = os.getloadavg()[0]
            done = run_isolated(direct, workload, values, spinning, args.calls, timeout=600)
            fig = done.value if done.ok else {"error": done.reason()}
            rows.append({"rep": rep, "variant": name, "how": "direct", "load1": round(load, 2), **fig})
            _append(out, rows[-1])
            print(rows[-1], flush=True)
        for name, values in TUNED.items() if args.tune_figures else ():
            for how, fn in (("search", lambda values=values: search_figure(workload, values, args.measure_s)),
                            ("final", lambda values=values: final_figure(workload, values, args.rounds))):
                load = os.getloadavg()[0]
                rows.append({"rep": rep, "variant": name, "how": how, "load1": round(load, 2), **fn()})
                _append(out, rows[-1])
                print(rows[-1], flush=True)
    loads = [r["load1"] for r in rows]
    print(f"\n{fp['cpu_model']}, {fp['cpu_count']} cores, flags {' '.join(fp['cpu_flags'])}; 1-min load "
          f"{min(loads)}-{max(loads)}; medians over {args.reps} processes of per-call medians (ms)\n"
          "| engine | eager after eager | eager after engine | engine after engine | engine after eager |\n"
          "|---|---|---|---|---|")
    for name in DIRECT:
        print(f"| {name} | " + " | ".join(_med(rows, name, "direct", k) for k in ("E<E", "E<O", "O<O", "O<E")) + " |")
    if args.tune_figures:
        print("\n| candidate | search speed-up | final speed-up |\n|---|---|---|")
        for name in TUNED:
            print(f"| {name} | {_med(rows, name, 'search', 'speedup')} | {_med(rows, name, 'final', 'speedup')} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
