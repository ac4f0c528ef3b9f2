"""Measured trials per minute and final speed-up of the README's first command, at a git revision
against the working tree (issue #12: warm isolated workers, target >= 3x the measured trials in
the same budget with the same or better final speed-up).

Each variant runs `autotiacc tune MODEL --batch-size 8 --budget 2m` as a user would (a
subprocess of that tree's code), one after the other, in the environment of this command. The
load average is recorded before and after each run: the machine is shared. The plan.json of
each run is copied next to the CSV, so `experiments/fidelity.py` re-measures both plans the same
way (alternating fresh processes, default environment): the recorded speed-ups were measured
differently (before: interleaved under OMP_WAIT_POLICY=PASSIVE; after: per-variant processes).

    python experiments/trials_per_minute.py --rev 88bab40
    python experiments/trials_per_minute.py --rev 88bab40 --also-run-dir /tmp/before-run:before-idle
    python experiments/trials_per_minute.py --rev 88bab40 --passive-too --skip-default-env --concurrent
    python experiments/trials_per_minute.py --rev 88bab40 --repeat 2 --fresh-caches

`--fresh-caches` gives each variant its own empty compile and profile caches at the start
(TORCHINDUCTOR_CACHE_DIR, AUTOTIACC_CACHE_DIR), so with `--repeat 2` the first run of each is
a first tune on a fresh machine and the second a later tune of the same model; the runs
alternate (before, after, before, after) so both see the same drift in load.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MEASURED = ("ok", "pruned", "rejected")  # a trial that built a candidate and checked or timed it


def summarise(run_dir: Path, *, variant: str, rev: str, budget_s: float, wall_s: float | None,
              load: tuple[float, float] | None) -> dict:
    """One CSV row from a run directory's trials.csv and plan.json."""
    import pandas as pd

    if not (run_dir / "plan.json").exists():  # the tune failed (e.g. the baseline did not finish in time)
        return {"variant": variant, "rev": rev, "budget_s": budget_s, "wall_s": round(wall_s or 0, 1),
                "trials_run": 0, "trials_measured": 0, "measured_per_min": 0.0, "median_trial_s": "",
                "speedup_recorded": "", "plan": "tune failed: see its .log", "final_method": "", "measured_env": "",
                "load_before": load[0] if load else "", "load_after": load[1] if load else "", "run_dir": str(run_dir)}
    trials = pd.read_csv(run_dir / "trials.csv")
    status = trials["status"].fillna("")
    plan = json.loads((run_dir / "plan.json").read_text())
    measured = int(status.isin(MEASURED).sum())
    run = int((~status.isin(("duplicate", "skipped", ""))).sum())
    return {"variant": variant, "rev": rev, "budget_s": budget_s, "wall_s": round(wall_s, 1) if wall_s else "",
            "trials_run": run, "trials_measured": measured, "measured_per_min": round(measured / (budget_s / 60), 2),
            "median_trial_s": round(float(trials.loc[status.isin(MEASURED), "wall_s"].median()), 2),
            "speedup_recorded": round(float(plan.get("speedup") or 1.0), 3), "plan": _label(plan),
            "final_method": "alternating processes" if "final_alternating" in plan.get("extra", {})
            else "interleaved, one process",
            "measured_env": json.dumps({k: v for k, v in (plan.get("extra", {}).get("measured_env") or {}).items() if v}),
            "load_before": load[0] if load else "", "load_after": load[1] if load else "", "run_dir": str(run_dir)}


def _label(plan: dict) -> str:
    try:
        from autotiacc.inference.plan import Plan

        return Plan.from_dict(plan).label
    except Exception:  # noqa: BLE001 - an older plan schema: the note still says what it is
        return str(plan.get("note", ""))[:60]


def start_tune(tree: Path, model: str, out: Path, *, budget: str, batch_size: int,
               env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    """Start the tune with `tree`'s code, `env` added to this environment (output to OUT.log)."""
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, **env, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", model, "--batch-size", str(batch_size), "--budget", budget,
           "--out", str(out)]
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - the child writes it
    return subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT), time.monotonic()


def checkout(rev: str) -> Path:
    tree = Path(f"/tmp/autotiacc-rev-{rev}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    return tree


def plot(rows: list[dict], path: Path) -> None:
    from autotiacc.report.plotting import figure

    with figure(path, title="autotiacc tune examples/convnet.py --batch-size 8 (same budget)",
                xlabel="measured trials per minute of budget", size=(8, 3.5)) as ax:
        names = [f"{r['variant']}\n{r['speedup_recorded'] or '-'}x recorded" for r in rows]
        ax.barh(names, [r["measured_per_min"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.text(r["measured_per_min"], i, f" {r['trials_measured']} trials (load {r['load_before']})",
                    va="center", fontsize=8)


def per_trial_ab(model: str, batch_size: int, rounds: int, out: Path) -> list[dict]:
    """Wall time of one trial (torchscript candidate vs baseline, as a tune's trial runs it) in a
    fresh process per trial (how trials ran before) against a warm worker, alternating A B A B so
    both see the same load. Both run the working tree's `evaluate`; the fresh arm pays the process
    start, torch import and model/baseline build every time, which is what the warm worker saves."""
    from autotiacc.engine.workers import WorkerPool, run_isolated
    from autotiacc.inference.evaluate import evaluate
    from autotiacc.inference.workload import load_workload

    workload = load_workload(ROOT / model, batch_size=batch_size)
    cand = {"candidate": {"execution": {"backend": "torchscript"}}}
    kw = {"target_s": 2.0, "prune_above": 2.0, "timeout": 300}
    rows = []
    with WorkerPool() as pool:
        pool.call(evaluate, workload, cand, **kw)  # the tune's first trial starts the worker: not counted
        for r in range(rounds):
            for arm in (("fresh", "warm") if r % 2 == 0 else ("warm", "fresh")):
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                res = (run_isolated if arm == "fresh" else pool.call)(evaluate, workload, cand, **kw)
                rows.append({"round": r, "arm": arm, "trial_s": round(time.monotonic() - t0, 2), "ok": res.ok,
                             "load": round(load, 2)})
                print(rows[-1], flush=True)
    with open(out / "per_trial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="88bab40", help="the 'before' git revision")
    ap.add_argument("--model", default="examples/convnet.py")
    ap.add_argument("--budget", default="2m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "trials_per_minute"))
    ap.add_argument("--also-run-dir", action="append", default=[], metavar="DIR:NAME",
                    help="add an existing run directory as a row (e.g. one measured on an idle machine)")
    ap.add_argument("--passive-too", action="store_true",
                    help="also run the working tree with OMP_WAIT_POLICY=PASSIVE set (separates workers from env)")
    ap.add_argument("--concurrent", action="store_true", help="run the variants at the same time (same load)")
    ap.add_argument("--repeat", type=int, default=1, help="run each variant this many times, alternating")
    ap.add_argument("--fresh-caches", action="store_true",
                    help="each variant gets its own empty inductor and profile caches before its first run")
    ap.add_argument("--skip-default-env", action="store_true", help="leave out the working tree in the default env")
    ap.add_argument("--per-trial", type=int, default=0, metavar="ROUNDS",
                    help="instead: time single trials, fresh process vs warm worker, alternating, ROUNDS each")
    args = ap.parse_args()
    from autotiacc.durations import parse_duration

    if args.per_trial:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        rows = per_trial_ab(args.model, args.batch_size, args.per_trial, Path(args.out))
        import statistics

        med = {a: statistics.median(r["trial_s"] for r in rows if r["arm"] == a) for a in ("fresh", "warm")}
        print(f"median trial: fresh process {med['fresh']:.2f} s, warm worker {med['warm']:.2f} s "
              f"-> {med['fresh'] / med['warm']:.2f}x the trials per minute")
        return

    budget_s = parse_duration(args.budget, name="budget")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.also_run_dir:
        d, _, name = spec.partition(":")
        rows.append(summarise(Path(d), variant=name or Path(d).name, rev="?", budget_s=budget_s, wall_s=None,
                              load=None))
        shutil.copy(Path(d) / "plan.json", out / f"{name or Path(d).name}.plan.json")
    variants = [(f"before ({args.rev})", "before", checkout(args.rev), {})]
    if not args.skip_default_env:
        variants.append(("after (working tree)", "after", ROOT, {}))
    if args.passive_too:  # the same wait policy the 'before' trials imposed, now set by the user: workers alone
        variants.append(("after, tune run with OMP_WAIT_POLICY=PASSIVE", "after-passive", ROOT,
                         {"OMP_WAIT_POLICY": "PASSIVE"}))
    # --concurrent: all variants at once, so they share the machine's load alike (a shared machine's
    # load swings by 2x within minutes); else one after the other, each alone.
    if args.fresh_caches:
        for _, short, _, env in variants:
            caches = Path("/tmp") / f"tpm-caches-{short}"
            shutil.rmtree(caches, ignore_errors=True)
            env.update(TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), AUTOTIACC_CACHE_DIR=str(caches / "autotiacc"))
    if args.repeat > 1:
        variants = [(f"{v} run {i + 1}", f"{s}-run{i + 1}", tree, env)
                    for i in range(args.repeat) for v, s, tree, env in variants]
    groups = [variants] if args.concurrent else [[v] for v in variants]
    for group in groups:
        load0 = os.getloadavg()[0]
        started = [(v, *start_tune(v[2], args.model, Path("/tmp") / f"tpm-{v[1]}", budget=args.budget,
                                   batch_size=args.batch_size, env=v[3])) for v in group]
        for (variant, short, tree, _), proc, t0 in started:
            proc.wait()
            run_dir = Path("/tmp") / f"tpm-{short}"
            rows.append(summarise(run_dir, variant=variant + (" [concurrent]" if args.concurrent else ""),
                                  rev=args.rev if tree != ROOT else "worktree", budget_s=budget_s,
                                  wall_s=time.monotonic() - t0, load=(round(load0, 2), round(os.getloadavg()[0], 2))))
            shutil.copy(run_dir.parent / f"{run_dir.name}.log", out / f"{short}.log")
            if (run_dir / "plan.json").exists():
                shutil.copy(run_dir / "plan.json", out / f"{short}.plan.json")
    with open(out / "trials_per_minute.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fp = subprocess.run([sys.executable, "-m", "autotiacc.cli", "env"], capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    (out / "machine.txt").write_text(fp)
    plot(rows, out / "trials_per_minute.png")
    for r in rows:
        print({k: r[k] for k in ("variant", "trials_measured", "measured_per_min", "median_trial_s",
                                 "speedup_recorded", "final_method", "load_before", "load_after")})


if __name__ == "__main__":
    main()
