"""Does a deployable artifact keep the speed of the plan it was exported from?

For one model file, in ONE process on ONE machine: for each backend a plan can choose, build the
plan's candidate (`OptimizedModel`, what `plan.apply` returns), export its artifact
(`autotiacc.inference.artifacts`), load it back with `autotiacc.load_artifact` (sha256 checked), and time
eager fp32, every candidate and every artifact interleaved (measure.measure_interleaved).
Writes a CSV row per variant and prints a table. Run with OMP_WAIT_POLICY=PASSIVE (as trial
processes do) so torch and ONNX Runtime threads do not fight in one process.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_artifacts.py examples/convnet.py --out /tmp/artifacts.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autotiacc  # noqa: E402
from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.inference.artifacts import export_for_plan  # noqa: E402
from autotiacc.inference.candidate import OptimizedModel  # noqa: E402
from autotiacc.inference.plan import Plan  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402
from autotiacc.knobs import configs_from_params  # noqa: E402
from autotiacc.measure import measure_interleaved  # noqa: E402

BACKENDS = {"torchscript": {"execution": {"backend": "torchscript"}},
            "compile": {"execution": {"backend": "compile", "freezing": True}},
            "onnxruntime": {"execution": {"backend": "onnxruntime"}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", default="artifacts.csv")
    ap.add_argument("--measure-s", type=float, default=6.0)
    args = ap.parse_args()
    wl = load_workload(args.model)
    model, inputs = wl.build_model(), wl.example_inputs()
    runners, setup = {}, {}

    def eager():
        with torch.no_grad():
            return model(*inputs)

    runners["eager fp32"] = eager
    work = Path(tempfile.mkdtemp(prefix="autotiacc-artifacts-"))
    for name, values in BACKENDS.items():
        cand = OptimizedModel(model, configs_from_params(values), example_inputs=inputs)
        runners[f"plan {name}"] = (lambda c=cand: c(*inputs))
        setup[f"plan {name}"] = cand.build_seconds
        d = work / name
        d.mkdir()
        Plan(knobs=configs_from_params(values)).save(d / "plan.json")
        t0 = time.perf_counter()
        entry = export_for_plan(d, wl)
        art = autotiacc.load_artifact(d)
        runners[f"artifact {entry['format']}"] = (lambda a=art: a(*inputs))
        setup[f"artifact {entry['format']}"] = time.perf_counter() - t0
    timings = measure_interleaved(runners, target_s=args.measure_s, warmup_s=2.0)
    base = timings["eager fp32"].median
    fp = fingerprint()
    rows = [{"variant": n, "median_ms": round(t.median, 4), "p90_ms": round(t.p90, 4), "spread": round(t.iqr_rel, 3),
             "n": t.n, "speedup_vs_eager": round(base / t.median, 3), "setup_s": round(setup.get(n, 0.0), 2),
             "model": wl.name, "fingerprint": fingerprint_id(fp), "torch": fp["torch"]}
            for n, t in timings.items()]
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"| variant | median ms | spread | speed-up vs eager | setup s |  ({wl.name}, {fingerprint_id(fp)})")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']} | {r['spread']:.0%} | {r['speedup_vs_eager']}x | {r['setup_s']} |")


if __name__ == "__main__":
    main()
