"""Peers timed alone: the autotiacc plan against what a user would deploy by hand, each variant in
its own fresh process, on a quiet machine (issue 19, item 8).

For each model case (model, batch):
  1. a process of its own builds the model (random weights, seed 0), draws the inputs, runs
     eager fp32 on them (the reference) and writes what the engines load: the ONNX export
     (torch.onnx.export's defaults), ONNX Runtime's own int8 quantizations (quantize_static, QDQ,
     calibrated on the model's example inputs; quantize_dynamic) and the OpenVINO IR
     (openvino.convert_model); see peers.py;
  2. `autotiacc tune MODEL --budget B` runs in a subprocess, as a user runs it (or --skip-tune
     reuses a plan);
  3. every variant (eager fp32, TorchScript trace + freeze, torch.compile default, ONNX Runtime
     with its defaults, its int8 static and dynamic, OpenVINO with its defaults and with
     INFERENCE_PRECISION_HINT f32, `load_plan(...).apply(model)`) runs in a fresh process per
     round, rounds taken in turns (A B C ... A B C ...), in the environment of this command
     (nothing imposed: no OMP_WAIT_POLICY, no thread settings): warm-up, then one timed window;
  4. per variant: the median of its windows' medians (ms), their spread ((max - min) / median),
     and the worst relative L2 error against eager fp32 on three other inputs.

The machine must be quiet (experiments/quiet_machine.py): before the first process (other processes'
CPU, steal, load average), and during each timed process (other processes' CPU and steal while
it ran). A busy start is refused (--allow-busy runs anyway, writes nothing to RESULTS.md); a
busy window is marked in the CSVs and the table.

Writes under experiments/results/<fingerprint>/ (or --out): peers-<time>.csv (a row per
variant), peers-<time>-windows.csv (a row per process), peers-<time>.png; appends the table,
with the CPU model and flags, to experiments/RESULTS.md ("plan vs best peer": the fastest peer
within the plan's accuracy tolerance over the plan).

    python experiments/bench_peers.py --budget 10m                       # every model, ~1.5-2 h
    python experiments/bench_peers.py --models resnet50:1 --budget 2m --rounds 2 --window-s 2
    python experiments/bench_peers.py --models bert:1 --skip-tune runs/bert   # reuse a plan

Needs the bench venv (README): torch 2.14.1, torchvision 0.29.1, transformers, onnxruntime,
openvino, nncf.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from peers import PEERS  # noqa: E402
from quiet_machine import CpuSample, check_quiet, judge, top_others  # noqa: E402

DEFAULT_MODELS = "resnet50:1,resnet50:8,bert:1,mobilenet_v3_large:1,efficientnet_b0:1,vit_b_16:1,distilbert:1"
PEERS_PY = HERE / "peers.py"
DEFAULT_TOLERANCE = 2e-2  # autotiacc's level-1 tolerance, for a case without a plan


@dataclass
class Case:
    name: str
    model_file: Path
    batch: int

    @property
    def slug(self) -> str:
        return f"{self.name}-bs{self.batch}"


def parse_cases(text: str) -> list[Case]:
    """`name:batch,...`: a file of experiments/models/ (or a path to a model.py), a batch size."""
    cases = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, batch = item.rpartition(":") if ":" in item else (item, "", "1")
        path = Path(name) if name.endswith(".py") else HERE / "models" / f"{name}.py"
        if not path.is_file() or not batch.isdigit() or int(batch) < 1:
            known = ", ".join(sorted(p.stem for p in (HERE / "models").glob("*.py")))
            raise ValueError(f"--models: {item!r} is not MODEL:BATCH with MODEL one of {known} (or a model.py path) "
                             "and BATCH a positive integer")
        cases.append(Case(Path(name).stem, path.resolve(), int(batch)))
    return cases


# -- fresh processes -----------------------------------------------------------------------------
def run_child(spec: dict[str, Any], work: Path, *, timeout: float) -> dict[str, Any]:
    """One fresh process of peers.py on `spec`, in this command's environment; its result, or
    why it has none (timeout, crash)."""
    tag = uuid.uuid4().hex[:8]
    spec_path, result, log = work / f"spec-{tag}.json", work / f"result-{tag}.json", work / f"child-{tag}.log"
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, str(PEERS_PY), str(spec_path)], env=env, stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timeout: no result within {timeout:.0f} s (log: {log})"}
    if result.is_file():
        return json.loads(result.read_text())
    tail = log.read_text()[-400:].strip().replace("\n", " | ")
    return {"status": "failed", "error": f"exit code {proc.returncode}, no result: {tail}"}


def measure_case(case: Case, variants: list[str], *, rounds: int, warmup_s: float, window_s: float, work: Path,
                 plan: Path | None = None, timeout: float = 900.0,
                 progress: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prepare the case's reference and artifacts, then time `variants` in turns, a fresh process
    per variant per round. Returns (the preparation's notes, a row per process). A variant that
    fails is not run again."""
    from autotiacc.hardware import usable_cores

    work.mkdir(parents=True, exist_ok=True)
    base = {"model_file": str(case.model_file), "batch": case.batch, "work": str(work)}
    progress(f"{case.slug}: preparing the reference and the artifacts ...")
    prep = run_child({**base, "prepare": True, "variants": variants}, work, timeout=timeout)
    if prep.get("status") != "ok":
        raise RuntimeError(f"{case.slug}: preparation failed: {prep.get('error')}")
    rows, failed = [], {}
    for r in range(rounds):
        for v in variants:
            if v in failed:
                continue
            a = CpuSample.now()
            res = run_child({**base, "variant": v, "plan": str(plan) if plan else None, "warmup_s": warmup_s,
                             "window_s": window_s}, work, timeout=timeout)
            q = judge(a, CpuSample.now(), cores=usable_cores())
            row = {"model": case.name, "batch": case.batch, "variant": v, "round": r, "status": res["status"],
                   "others_cores": q.others_cores, "steal": q.steal, "quiet": q.quiet, "quiet_why": q.why}
            if res["status"] == "ok":
                samples = res["samples_ms"]
                row.update(median_ms=statistics.median(samples), calls=len(samples), pid=res["pid"],
                           build_s=res["build_s"], first_call_s=res["first_call_s"], rel_err=res["rel_err"],
                           torch_threads=res["torch_threads"], samples_ms=samples,
                           env={name: val for name, val in res["env"].items() if val is not None})
                progress(f"  round {r + 1}/{rounds} {v}: {row['median_ms']:.3g} ms"
                         + ("" if q.quiet else f"  [busy: {q.why}]"))
            else:
                failed[v] = row["error"] = res.get("error", "")
                progress(f"  round {r + 1}/{rounds} {v}: failed: {failed[v][:200]}")
            rows.append(row)
    return prep, rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per (model, batch, variant): median of the windows' medians, spread, worst error,
    how many windows were busy."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["model"], row["batch"], row["variant"])
        s = out.setdefault(key, {"model": key[0], "batch": key[1], "variant": key[2], "windows": [], "errors": [],
                                 "busy": 0, "builds": []})
        s["busy"] += not row["quiet"]
        if row["status"] == "ok":
            s["windows"].append(row["median_ms"])
            s["errors"].append(row["rel_err"])
            s["builds"].append(row["build_s"] + row["first_call_s"])  # torch.compile builds in its first call
        else:
            s["error"] = row.get("error", "")
    summary = []
    for s in out.values():
        w = s.pop("windows")
        errors, builds = s.pop("errors"), s.pop("builds")
        if w:
            med = statistics.median(w)
            s.update(status="ok", median_ms=med, spread=(max(w) - min(w)) / med, rounds=len(w),
                     rel_err=max(errors), setup_s=statistics.median(builds))
        else:
            s.update(status="failed", rounds=0)
        summary.append(s)
    return summary


# -- tune ------------------------------------------------------------------------------------------
def tune(case: Case, budget: str, out: Path) -> Path:
    """`autotiacc tune` as a user runs it, in this command's environment; the plan file."""
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", str(case.model_file), "--batch-size", str(case.batch),
           "--budget", budget, "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{case.slug}: autotiacc tune failed: {res.stderr.strip()[-500:]}")
    return out / "plan.json"


def reused_plan(case: Case, plan_dir: Path, n_cases: int) -> Path:
    """--skip-tune: PLAN_DIR/<model>-bs<batch>/plan.json (or .../tune/plan.json: an earlier
    benchmark's --work folder), or PLAN_DIR/plan.json for one case."""
    for p in (plan_dir / case.slug / "plan.json", plan_dir / case.slug / "tune" / "plan.json",
              plan_dir / "plan.json" if n_cases == 1 else None):
        if p is not None and p.is_file():
            return p
    raise ValueError(f"--skip-tune: no plan for {case.slug}: expected {plan_dir / case.slug / 'plan.json'}"
                     + (f" or {plan_dir / 'plan.json'}" if n_cases == 1 else ""))


# -- results ---------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("torch", "torchvision", "transformers", "onnxruntime", "openvino", "nncf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def plan_vs_best_peer(summary: list[dict[str, Any]], tolerance: float) -> float | None:
    """The fastest peer within `tolerance` (relative L2 vs eager fp32) over the plan, for one case."""
    by = {s["variant"]: s for s in summary if s["status"] == "ok"}
    if "plan" not in by:
        return None
    peers = [s["median_ms"] for v, s in by.items() if v != "plan" and s["rel_err"] <= tolerance]
    return min(peers) / by["plan"]["median_ms"] if peers else None


def write_csv(path: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    import csv

    rows = [{**r, **extra} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "samples_ms"))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, summary: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((s["model"], s["batch"]) for s in summary))
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 2.2 + 0.35 * len(PEERS) * len(cases)), squeeze=False)
    for ax, (model, batch) in zip(axes[:, 0], cases):
        rows = [s for s in summary if (s["model"], s["batch"]) == (model, batch) and s["status"] == "ok"]
        eager = next((s["median_ms"] for s in rows if s["variant"] == "eager"), None)
        names = [PEERS[s["variant"]] for s in rows]
        speed = [eager / s["median_ms"] if eager else 0.0 for s in rows]
        ax.barh(names, speed, color=["tab:red" if s["variant"] == "plan" else "tab:blue" for s in rows])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.invert_yaxis()  # in the table's order, eager on top
        ax.set_title(f"{model}, batch {batch}: speed-up over eager fp32 (each alone in its process)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(summary: list[dict[str, Any]], tolerances: dict[tuple, float], labels: dict[tuple, str]) -> list[str]:
    """Markdown: a row per case, median ms per peer (best peer within tolerance in bold; † outside
    the tolerance; * a busy window), the plan's label and plan vs best peer."""
    cols = [v for v in PEERS if any(s["variant"] == v for s in summary)]
    lines = ["| model | batch | " + " | ".join(PEERS[v] for v in cols) + " | plan vs best peer |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for key in dict.fromkeys((s["model"], s["batch"]) for s in summary):
        rows = {s["variant"]: s for s in summary if (s["model"], s["batch"]) == key}
        tol = tolerances.get(key, DEFAULT_TOLERANCE)
        ok = [s for v, s in rows.items() if v != "plan" and s["status"] == "ok" and s["rel_err"] <= tol]
        best = min(ok, key=lambda s: s["median_ms"])["variant"] if ok else None
        cells = []
        for v in cols:
            s = rows.get(v)
            if s is None or s["status"] != "ok":
                cells.append("failed" if s else "–")
                continue
            cell = _ms(s["median_ms"]) + ("†" if s["rel_err"] > tol else "") + ("*" if s["busy"] else "")
            cell = f"**{cell}**" if v == best else cell
            cells.append(cell + (f" ({labels[key]})" if v == "plan" and labels.get(key) else ""))
        ratio = plan_vs_best_peer(list(rows.values()), tol)
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {f'{ratio:.2f}×' if ratio else '–'} |")
    return lines


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def append_results_md(path: Path, table: list[str], header: list[str]) -> None:
    with open(path, "a") as fh:
        fh.write("\n" + "\n".join(header + [""] + table) + "\n")


# -- the command -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"MODEL:BATCH,... (default {DEFAULT_MODELS})")
    p.add_argument("--budget", default="10m", help="autotiacc tune's --budget per case (default 10m)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, taken in turns (default 3)")
    p.add_argument("--window-s", type=float, default=3.0, help="timed window per process, after warm-up (default 3)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up per process after the first call (default 1)")
    p.add_argument("--skip-tune", type=Path, metavar="PLAN_DIR",
                   help="reuse plans: PLAN_DIR/<model>-bs<batch>/[tune/]plan.json (an earlier --work folder), or "
                        "PLAN_DIR/plan.json for one case")
    p.add_argument("--peers", default=",".join(PEERS), help="variants to time (default: all)")
    p.add_argument("--out", type=Path, help="results folder (default experiments/results/<fingerprint>/)")
    p.add_argument("--work", type=Path, help="artifacts, tunes and logs (default experiments/runs/peers-<time>/)")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md", help="the table is appended here")
    p.add_argument("--allow-busy", action="store_true", help="run on a busy machine (marked; no RESULTS.md)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per process (default 900)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.peers.split(",")) - set(PEERS))
    if unknown or args.rounds < 1 or args.window_s <= 0:
        p.error(f"--peers: unknown {unknown} (use {','.join(PEERS)})" if unknown else "--rounds >= 1, --window-s > 0")
    try:  # every case and reused plan is checked before anything runs
        args.cases = parse_cases(args.models)
        args.plans = ({c.slug: reused_plan(c, args.skip_tune, len(args.cases)) for c in args.cases}
                      if args.skip_tune and "plan" in args.peers.split(",") else {})
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    from autotiacc.hardware import fingerprint, fingerprint_id

    args = parse_args(argv)
    cases, stamp = args.cases, time.strftime("%Y%m%d-%H%M%S")
    variants = [v for v in PEERS if v in args.peers.split(",")]
    start = check_quiet()
    print(f"machine before the benchmark: {start.why} (others {start.others_cores:.2f} cores, steal {start.steal:.0%}, "
          f"load {start.load1:.2f} on {start.cores} cores)")
    if not start.quiet and not args.allow_busy:
        print("refused: the machine is busy, figures would not be trustworthy. Busiest others: "
              + ("; ".join(top_others()) or "none seen now") + ". Run when it is quiet, or --allow-busy (marked).")
        return 2
    fp = fingerprint("cpu")
    out = args.out or HERE / "results" / fingerprint_id(fp)
    work = args.work or HERE / "runs" / f"peers-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    windows, summary, tolerances, labels = [], [], {}, {}
    for case in cases:
        key = (case.name, case.batch)
        rows, tolerances[key], labels[key] = run_case(case, args, variants, work / case.slug)
        windows += rows
        summary += summarize(rows)
    extra = {"cpu_model": fp["cpu_model"], "cpu_flags": " ".join(fp["cpu_flags"]), "cores": fp["cpu_count"],
             "fingerprint_id": fingerprint_id(fp), "budget": args.budget if "plan" in variants and not args.skip_tune
             else None,
             "quiet_before": start.quiet, "load1_before": round(start.load1, 2), "timestamp": stamp,
             **{f"v_{k}": v for k, v in versions().items()}}
    write_csv(out / f"peers-{stamp}.csv", summary, extra)
    write_csv(out / f"peers-{stamp}-windows.csv", windows, extra)
    plot(out / f"peers-{stamp}.png", summary)
    table = results_table(summary, tolerances, labels)
    print("\n".join(table))
    busy = sum(s["busy"] for s in summary)
    if start.quiet and not args.allow_busy:
        append_results_md(args.results_md, table, _header(fp, args, stamp, busy, out))
        print(f"table appended to {args.results_md}")
    print(f"wrote {out / f'peers-{stamp}.csv'}, -windows.csv and .png")
    return 0


def run_case(case: Case, args, variants: list[str], work: Path) -> tuple[list[dict], float, str]:
    """Tune (or reuse a plan), then time every variant; (a row per process, the plan's
    tolerance, its label). A tune that fails is the plan's failed row; the peers are still timed."""
    plan, tolerance, label, why = None, DEFAULT_TOLERANCE, "", None
    if "plan" in variants:
        try:
            if args.skip_tune:
                plan = args.plans[case.slug]
            else:
                print(f"{case.slug}: autotiacc tune --budget {args.budget} ...", flush=True)
                plan = tune(case, args.budget, work / "tune")
        except RuntimeError as exc:
            why = str(exc)
            print(why)
    if plan is not None:
        data = json.loads(plan.read_text())
        tolerance, label = data.get("tolerance") or DEFAULT_TOLERANCE, _plan_label(data)
    prep, rows = measure_case(case, [v for v in variants if v != "plan" or plan], rounds=args.rounds,
                              warmup_s=args.warmup_s, window_s=args.window_s, work=work, plan=plan,
                              timeout=args.timeout_s)
    print(f"{case.slug}: artifacts {json.dumps({k: v for k, v in prep.items() if k != 'status'})}")
    if why:
        rows.append({"model": case.name, "batch": case.batch, "variant": "plan", "round": 0, "status": "failed",
                     "error": why, "quiet": True})
    return rows, tolerance, label


def _plan_label(data: dict[str, Any]) -> str:
    from autotiacc.inference.plan import Plan

    try:
        return Plan.from_dict(data).label
    except Exception:  # noqa: BLE001 - the label is only for the table
        return "?"


def _header(fp: dict[str, Any], args, stamp: str, busy: int, out: Path) -> list[str]:
    v = versions()
    return [f"## Peers, each alone in its own process (bench_peers.py, {stamp})", "",
            f"- Machine: {fp['cpu_model']}, {fp['cpu_count']} cores; flags: {' '.join(fp['cpu_flags'])}",
            f"- Software: torch {v['torch']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino']}; "
            f"plans from `autotiacc tune --budget {args.budget if not args.skip_tune else '(reused)'}`",
            f"- Timing: {args.rounds} rounds taken in turns, a fresh process per variant per round, default "
            f"environment; {args.warmup_s:g} s warm-up, {args.window_s:g} s window; median of the windows' "
            f"medians (ms). Quiet at the start; busy windows: {busy}.",
            f"- † outside the plan's accuracy tolerance (relative L2 vs eager fp32); * a busy window; bold: "
            f"the best peer within the tolerance. Files: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
            f"/peers-{stamp}.*`"]


if __name__ == "__main__":
    sys.exit(main())
