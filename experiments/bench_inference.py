"""Side-by-side inference benchmark: autotiacc's tuned plan against what a user would do by hand.

For each case (model, batch) this script, in ONE run on ONE machine:
  1. runs `autotiacc tune` on the model with the stated budget (a subprocess, as a user would);
  2. builds every variant in this process: eager fp32, TorchScript freeze + optimize_for_inference,
     torch.compile (default, max-autotune), bf16 autocast by hand, ONNX Runtime (when installed),
     and the tuned plan applied with `load_plan(...).apply(model)`;
  3. times all of them interleaved round-robin (measure.measure_interleaved), so drift hits all alike;
  4. writes a CSV row per variant (median/p90/spread, speed-up vs eager, accuracy error vs fp32
     eager, setup/compile time, fingerprint) and a bar chart; appends the table to RESULTS.md.

The peers are built with autotiacc's own knob recipes (the same code a plan uses), with
`inference_mode` off so they run under plain `no_grad`, as a user's eager code would.

    python experiments/bench_inference.py --cases convnet:8,transformer:1 --budget 2m
    python experiments/bench_inference.py --cases resnet50:1,resnet50:8,bert:1,dlrm:128 --budget 3m
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

# Variants timed interleaved in ONE process need passive OpenMP waits, or spinning threads of
# one slow the next (the tuner instead times each variant in its own process at the end; measured
# here: eager convnet 38 ms alone, 220 ms interleaved with ONNX Runtime and compiled models).
# It must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.inference.accuracy import compare_outputs  # noqa: E402
from autotiacc.inference.candidate import OptimizedModel  # noqa: E402
from autotiacc.inference.plan import load_plan  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402
from autotiacc.knobs import configs_from_params  # noqa: E402
from autotiacc.measure import measure_interleaved  # noqa: E402

MODEL_FILES = {
    "convnet": ROOT / "examples" / "convnet.py",
    "transformer": ROOT / "examples" / "transformer.py",
    "resnet50": HERE / "models" / "resnet50.py",
    "bert": HERE / "models" / "bert.py",
    "dlrm": HERE / "models" / "dlrm.py",
}
NO_GRAD = {"runtime": {"inference_mode": False}}
PEERS = {
    "torchscript freeze+ofi": {"execution": {"backend": "torchscript"}, **NO_GRAD},
    "torch.compile default": {"execution": {"backend": "compile"}, **NO_GRAD},
    "torch.compile max-autotune": {"execution": {"backend": "compile", "compile_mode": "max-autotune"}, **NO_GRAD},
    "bf16 autocast (by hand)": {"precision": {"mode": "bf16_autocast"}, **NO_GRAD},
    "onnxruntime": {"execution": {"backend": "onnxruntime"}, **NO_GRAD},
}
FIELDS = ["model", "batch", "variant", "median_ms", "p90_ms", "spread", "n", "speedup_vs_eager", "rel_err",
          "setup_s", "tune_wall_s", "status", "note", "cpu_model", "fingerprint_id", "torch", "omp_wait_policy",
          "load_avg", "timestamp"]


def tune(model: str, batch: int, budget: str, runs_dir: Path) -> tuple[Path, float]:
    out = runs_dir / f"{model}-bs{batch}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", str(MODEL_FILES[model]), "--batch-size", str(batch),
           "--budget", budget, "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"tune failed: {res.stderr.strip()[-500:]}")
    return out, time.monotonic() - t0


def bench_case(model_name: str, batch: int, budget: str | None, runs_dir: Path, measure_s: float,
               skip: set[str]) -> list[dict]:
    w = load_workload(MODEL_FILES[model_name], batch_size=batch)
    plan_dir, tune_wall = (None, None)
    if budget:
        plan_dir, tune_wall = tune(model_name, batch, budget, runs_dir)
    torch.manual_seed(0)
    model = w.build_model()
    inputs = w.example_inputs()
    checks = [w.example_inputs(seed=s) for s in (1, 2)]
    with torch.no_grad():
        refs = [model(*x) for x in checks]
    runners, rows = {}, {}

    def eager():
        with torch.no_grad():
            return model(*inputs)

    runners["eager fp32"] = eager
    rows["eager fp32"] = {"setup_s": 0.0, "rel_err": 0.0, "status": "ok", "note": ""}
    variants = {k: v for k, v in PEERS.items() if k not in skip}
    plan = None
    if plan_dir is not None:
        plan = load_plan(plan_dir / "plan.json")
        variants[f"autotiacc {budget}: {plan.label}"] = None
    for name, values in variants.items():
        print(f"  building {name} ...", flush=True)
        try:
            t0 = time.perf_counter()
            cand = (plan.apply(model, inputs) if values is None
                    else OptimizedModel(model, configs_from_params(values), example_inputs=inputs))
            setup = time.perf_counter() - t0
            acc = compare_outputs([cand(*x) for x in checks], refs, tolerance=float("inf"))
            runners[name] = lambda c=cand: c(*inputs)
            rows[name] = {"setup_s": setup, "rel_err": acc.rel_l2, "status": "ok",
                          "note": plan.note if values is None else ""}
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result to record
            rows[name] = {"status": "failed", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    print(f"  timing {len(runners)} variants interleaved ...", flush=True)
    timings = measure_interleaved(runners, target_s=measure_s, warmup_s=3.0)
    fp = fingerprint()
    base = timings["eager fp32"].median
    out = []
    for name, row in rows.items():
        t = timings.get(name)
        out.append({"model": model_name, "batch": batch, "variant": name,
                    "median_ms": t.median if t else None, "p90_ms": t.p90 if t else None,
                    "spread": t.iqr_rel if t else None, "n": t.n if t else 0,
                    "speedup_vs_eager": base / t.median if t else None, "tune_wall_s": tune_wall if "autotiacc" in name else None,
                    "cpu_model": fp["cpu_model"], "fingerprint_id": fingerprint_id(fp), "torch": fp["torch"],
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg": round(os.getloadavg()[0], 2), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **row})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(f"{r['model']} bs{r['batch']}" for r in rows))
    short = lambda v: "autotiacc (tuned)" if v.startswith("autotiacc") else v  # noqa: E731
    variants = list(dict.fromkeys(short(r["variant"]) for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(cases) + 2), 4.8))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for c, case in enumerate(cases):
            match = [r for r in rows if f"{r['model']} bs{r['batch']}" == case and short(r["variant"]) == v]
            if match and match[0]["speedup_vs_eager"]:
                xs.append(c + i * width - 0.4 + width / 2)
                ys.append(match[0]["speedup_vs_eager"])
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("speed-up over eager fp32 (x, measured interleaved)")
    ax.set_title(f"Inference latency, {rows[0]['cpu_model']}, torch {rows[0]['torch']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def append_results_md(rows: list[dict], csv_path: Path, png_path: Path, command: str) -> None:
    md = HERE / "RESULTS.md"
    fp = rows[0]
    lines = [f"\n## {fp['timestamp']} — {fp['cpu_model']} (`{fp['fingerprint_id']}`), torch {fp['torch']}", "",
             f"Command: `{command}`  ", f"CSV: `{csv_path.relative_to(ROOT)}`, plot: `{png_path.relative_to(ROOT)}`", "",
             "| model | batch | variant | median ms | p90 ms | spread | speed-up vs eager | rel. error | setup s | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k: str, s: str = ".3g", r: dict = r) -> str:
            return "–" if r.get(k) is None else format(r[k], s)

        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {f('median_ms')} | {f('p90_ms')} | "
                     f"{f('spread', '.2f')} | {f('speedup_vs_eager', '.2f')} | {f('rel_err', '.2g')} | "
                     f"{f('setup_s', '.1f')} | {r['status']} {r['note'][:80] if r['status'] != 'ok' else ''} |")
    if not md.exists():
        md.write_text("# Experiment results\n\nNewest last; old results are kept. Every table was measured in one run "
                      "on the machine named, all variants timed interleaved.\n")
    with md.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="convnet:8,transformer:1", help="model:batch,... of " + ",".join(MODEL_FILES))
    ap.add_argument("--budget", default="2m", help="autotiacc tune budget per case; 'none' to skip tuning")
    ap.add_argument("--measure-s", type=float, default=8.0, help="interleaved timing window per case")
    ap.add_argument("--skip", default="", help="comma-separated peer variants to leave out")
    args = ap.parse_args()
    fp = fingerprint()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = HERE / "results" / fingerprint_id(fp)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = HERE / "runs" / fingerprint_id(fp)
    budget = None if args.budget == "none" else args.budget
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows: list[dict] = []
    for case in args.cases.split(","):
        name, batch = case.split(":")
        print(f"[{time.strftime('%H:%M:%S')}] {name} batch {batch}", flush=True)
        rows += bench_case(name, int(batch), budget, runs_dir, args.measure_s, skip)
        csv_path = out_dir / f"inference-{stamp}.csv"
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    png_path = out_dir / f"inference-{stamp}.png"
    plot(rows, png_path)
    append_results_md(rows, csv_path, png_path, "python experiments/bench_inference.py " + " ".join(sys.argv[1:]))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
