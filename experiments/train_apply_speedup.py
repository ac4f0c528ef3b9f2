"""Done-means check for training: the user's own loop (examples/train_loop.py), run fresh
with and without a tuned plan, alternating A B A B ... so machine drift hits both alike.

    python experiments/train_apply_speedup.py runs/train_jpeg/plan.json --repeats 3 --epochs 2

Prints each run and the ratio of medians (steady and end-to-end samples/s); writes
experiments/results/train_apply_speedup.json. Figures depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

LOOP = Path(__file__).resolve().parents[1] / "examples" / "train_loop.py"


def run(plan: str | None, epochs: int, env: dict[str, str], train: str | None) -> dict:
    cmd = [sys.executable, str(LOOP), "--epochs", str(epochs)] + (["--plan", plan] if plan else [])
    cmd += ["--train", train] if train else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, **env}).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for both loops, e.g. "
                    "OMP_WAIT_POLICY=PASSIVE (what the tuner's trial processes use)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--train", default=None, help="train.py (default examples/train_jpeg.py)")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = {"default": [], "plan": []}
    for _ in range(args.repeats):
        for name, plan in (("default", None), ("plan", args.plan)):
            r = run(plan, args.epochs, env, args.train)
            rows[name].append(r)
            print(name, json.dumps(r), flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("steady_samples_per_s", "end_to_end_samples_per_s",
                                                                "final_loss")} for n, rs in rows.items()}
    summary = {"median": med, "runs": rows, "env": env, "command": " ".join(sys.argv),
               "steady_speedup": med["plan"]["steady_samples_per_s"] / med["default"]["steady_samples_per_s"],
               "end_to_end_speedup": med["plan"]["end_to_end_samples_per_s"] / med["default"]["end_to_end_samples_per_s"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    out = Path(__file__).resolve().parent / "results" / f"train_apply_speedup{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
