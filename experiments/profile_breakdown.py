"""Where a tune's first profile goes (issue #12, point 4: the profile and sensitivity pass
takes at most 10 % of the budget).

Runs the tune's own profiling step, `InferenceTask.prepare`, with a cold profile cache (a fresh
`AUTOTIACC_CACHE_DIR`) on the README's model, `--repeat` times, then a second `prepare` on the
same cache (a later tune of the same workload: reuse, or completion of a partial profile).
Inside the profile's worker process each stage is timed by wrapping the function that does it
(spawn and torch import: from the parent's call to the child's first line), and written as
it ends, so a profile killed at its cap still shows where its time went.

    python experiments/profile_breakdown.py                      # convnet bs 8, 2m budget
    python experiments/profile_breakdown.py --repeat 3 --out experiments/results/profile_breakdown

Writes `breakdown.csv` (one row per stage and run) and `runs.csv` (prepare's wall seconds,
the recorded profile seconds, the share of the budget, what the profile completed), with the
load average before each run.

`--tune N` instead runs the README's command, `autotiacc tune MODEL --batch-size 8 --budget 2m`,
N times on one fresh cache (run 1: a first tune on this machine), with the code of `--tree`
(default: this checkout; e.g. an export of an older revision), and records each run's "Where
the budget went" figures from run.json into `tunes.csv`:

    python experiments/profile_breakdown.py --tune 2 --out experiments/results/profile_breakdown/after
    git archive 61cfc09 | tar -x -C /tmp/before
    python experiments/profile_breakdown.py --tune 1 --tree /tmp/before --out .../before
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# (module, function, how to label a call from its arguments)
STAGES = [
    ("autotiacc.profiling.forward", "profile_workload", None),
    ("autotiacc.profiling.forward", "_op_table", None),
    ("autotiacc.profiling.attribution", "profile_forwards", None),
    ("autotiacc.profiling.forward", "_flops_and_bytes", None),
    ("autotiacc.profiling.forward", "_page_faults_per_call", None),
    ("autotiacc.profiling.forward", "candidate_groups", None),
    ("autotiacc.profiling.search", "analyse_sensitivity", None),
    ("autotiacc.profiling.sensitivity", "_try_mode", lambda a, k: f"{a[1]}:{a[2]}"),
    ("autotiacc.profiling.sensitivity", "_quick_speedup", None),
]


def instrumented(log_path: str, t_call: float, real):
    """A stand-in for `profile_for_search` that times its stages inside the worker."""
    def run(*args, **kwargs):
        import importlib

        def write(stage: str, seconds: float) -> None:
            with open(log_path, "a") as f:
                f.write(json.dumps({"stage": stage, "s": round(seconds, 3)}) + "\n")

        write("spawn, torch import, unpickle (to the child's first line)", time.time() - t_call)
        for mod_name, fn_name, label in STAGES:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, fn_name, None)
            if fn is None:
                continue

            def timed(*a, __fn=fn, __name=fn_name, __label=label, **k):
                t0 = time.perf_counter()
                try:
                    return __fn(*a, **k)
                finally:
                    write(__name + (f"[{__label(a, k)}]" if __label else ""), time.perf_counter() - t0)
            setattr(mod, fn_name, timed)
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            write("profile_for_search (in the child)", time.perf_counter() - t0)
    return run


def prepare_once(model: str, batch_size: int, budget_s: float, run_dir: Path, log_path: Path) -> dict:
    """One `InferenceTask.prepare` as `tune` runs it; returns its figures."""
    from autotiacc.engine.rundir import RunDir
    from autotiacc.profiling import search
    from autotiacc.inference.task import InferenceTask, TuneOptions
    from autotiacc.inference.workload import load_workload

    workload = load_workload(model, batch_size=batch_size)
    opts = TuneOptions(budget_s=budget_s, out_dir=run_dir)
    task = InferenceTask(workload, opts)
    task.validate(budget_s)
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    real = search.profile_for_search
    search.profile_for_search = instrumented(str(log_path), time.time(), real)
    try:
        t0 = time.monotonic()
        recorded = task.prepare(rd, budget_s)
        wall = time.monotonic() - t0
    finally:
        search.profile_for_search = real
    prof = json.loads((run_dir / "profile.json").read_text())
    sens = prof.get("sensitivity") or []
    return {"wall_s": round(wall, 2), "recorded_profile_s": round(recorded, 2),
            "share": round(recorded / budget_s, 3), "partial": prof.get("partial", ""),
            "groups": len(prof.get("groups") or []), "groups_analysed": sum(1 for g in sens if not g.get("skipped")),
            "search_groups": len(prof.get("search_groups") or []),
            "diagnosis": (prof.get("diagnosis") or {}).get("kind") or ""}


def tune_runs(model: str, runs: int, tree: Path, budget_s: float) -> list[dict]:
    """The README's command, `runs` times on one fresh cache; one row per run from run.json."""
    import subprocess

    env = {**os.environ, "AUTOTIACC_CACHE_DIR": tempfile.mkdtemp(prefix="autotiacc-cache-"),
           "PYTHONPATH": str(tree)}
    rows = []
    for i in range(runs):
        out = Path(tempfile.mkdtemp(prefix="autotiacc-tune-")) / "run"
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "autotiacc.cli", "tune", model, "--batch-size", "8", "--budget",
                        f"{budget_s:.0f}s", "--out", str(out), "--quiet"], env=env, cwd=tree, check=False)
        wall = time.monotonic() - t0
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        b = ((run.get("sessions") or [{}])[-1]).get("budget") or {}
        prof = json.loads((out / "profile.json").read_text()) if (out / "profile.json").is_file() else {}
        rows.append({"tree": str(tree), "run": i + 1, "load_before": round(load, 2),
                     "load_after": round(os.getloadavg()[0], 2), "wall_s": round(wall, 1),
                     "profile_s": b.get("profile_s"), "profile_share": round((b.get("profile_s") or 0) / budget_s, 3),
                     **{k: b.get(k) for k in ("build_s", "timing_s", "trial_other_s", "final_s", "other_s")},
                     "partial": prof.get("partial", ""),
                     "search_groups": len(prof.get("search_groups") or []), "run_dir": str(out)})
        print(json.dumps(rows[-1]))
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "convnet.py"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds")
    ap.add_argument("--repeat", type=int, default=1, help="cold-cache runs (each followed by one warm run)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the CSVs (default: print only)")
    ap.add_argument("--tune", type=int, default=0, help="run the README's tune this many times instead")
    ap.add_argument("--tree", type=Path, default=ROOT, help="--tune: the checkout whose code runs")
    args = ap.parse_args()
    if args.tune:
        rows = tune_runs(str(args.tree / "examples" / "convnet.py"), args.tune, args.tree.resolve(), args.budget)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_csv(args.out / "tunes.csv", rows)
        return
    stages, runs = [], []
    for i in range(args.repeat):
        cache = Path(tempfile.mkdtemp(prefix="autotiacc-cache-"))
        os.environ["AUTOTIACC_CACHE_DIR"] = str(cache)
        for which in ("first (cold cache)", "second (same cache)"):
            run_dir = Path(tempfile.mkdtemp(prefix="autotiacc-prepare-"))
            log = run_dir / "stages.jsonl"
            load = os.getloadavg()[0]
            row = {"run": i + 1, "which": which, "load_before": round(load, 2),
                   **prepare_once(args.model, args.batch_size, args.budget, run_dir, log)}
            runs.append(row)
            print(json.dumps(row))
            if log.is_file():
                for line in log.read_text().splitlines():
                    st = json.loads(line)
                    stages.append({"run": i + 1, "which": which, **st})
                    print(f"    {st['s']:7.2f} s  {st['stage']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("runs.csv", runs), ("breakdown.csv", stages)):
            write_csv(args.out / name, rows)
        from autotiacc.hardware import fingerprint

        (args.out / "machine.json").write_text(json.dumps(fingerprint("cpu"), indent=2, default=str))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
