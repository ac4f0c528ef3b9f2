"""Do recorded speed-ups hold in production? (issue #12, "Fidelity")

For every inference plan under experiments/ (files named `*plan.json`) and every
run directory or plan file given, re-measure the plan against eager fp32 the way production
runs it: each variant in a fresh process of its own, in the default environment of this
command, alternating A B A B ... (`autotiacc.engine.fidelity.measure_alternating`, fresh=True).
A plan "holds" when its recorded speed-up lies within the measured noise: between the lowest
and the highest speed-up of the rounds (each round pairs one baseline process with one plan
process taken back to back). Writes a CSV and a markdown table, with the load average.

    python experiments/fidelity.py                      # every plan under experiments/
    python experiments/fidelity.py /tmp/before-run --rounds 8
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SEARCH = (ROOT / "examples", HERE / "models")


def find_plans(extra: list[str], only: bool = False) -> list[Path]:
    found = [] if only else sorted(HERE.rglob("*plan.json"))
    for p in extra:
        path = Path(p)
        found.append(path / "plan.json" if path.is_dir() else path)
    return found


def model_file(plan) -> Path | None:
    """The model file the plan was tuned on, else one of the same name in examples/ or experiments/models/."""
    wl = plan.workload or {}
    recorded = Path(wl.get("file") or "")
    if recorded.is_file():
        return recorded
    for d in SEARCH:
        for cand in (d / recorded.name, d / f"{wl.get('name')}.py"):
            if cand.name and cand.is_file():
                return cand
    return None


def check(path: Path, *, rounds: int, window_s: float) -> dict:
    from autotiacc.engine.fidelity import measure_alternating
    from autotiacc.errors import AutotiaccError
    from autotiacc.inference.plan import load_plan
    from autotiacc.inference.shapes.shape_tuning import shape_tuning_for_plan, values_from_plan
    from autotiacc.inference.workload import load_workload

    row: dict = {"plan": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
    data = json.loads(path.read_text())
    if data.get("schema") != "autotiacc.plan":
        return {**row, "verdict": f"skipped: not an inference plan ({data.get('schema')})"}
    try:
        plan = load_plan(path)
    except AutotiaccError as exc:
        return {**row, "verdict": f"skipped: {exc}"}
    row.update(label=plan.label, recorded=round(plan.speedup or 1.0, 3),
               recorded_env=json.dumps({k: v for k, v in (plan.extra.get("measured_env") or {}).items() if v}),
               recorded_method="alternating processes" if "final_alternating" in plan.extra else "interleaved")
    model = model_file(plan)
    if model is None:
        return {**row, "verdict": "skipped: model file not found"}
    wl = plan.workload or {}
    shapes = ["x".join(str(d) for d in s) for s in wl.get("input_shapes") or []] if model.suffix != ".py" else None
    workload = load_workload(model, batch_size=wl.get("batch_size"), input_shapes=shapes)
    values = values_from_plan(plan)  # a traffic plan's buckets too, timed over its mix (its bench)
    try:
        bench = shape_tuning_for_plan(plan, workload).bench({"plan": values})
    except AutotiaccError as exc:
        return {**row, "verdict": f"skipped: {exc}"}
    load0 = os.getloadavg()[0]
    res = measure_alternating(workload, {"plan": values}, device=plan.device, rounds=rounds, window_s=window_s,
                              warmup_s=2.0, tolerance=plan.tolerance or 2e-2, fresh=True, bench=bench)
    row.update(load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2), rounds=res.rounds)
    if "plan" in res.failures or "baseline" in res.failures:
        return {**row, "verdict": "failed: " + "; ".join(f"{k}: {v}" for k, v in res.failures.items())[:300]}
    lo, hi = res.speedup_range("plan")
    holds = lo <= row["recorded"] <= hi
    row.update(measured=round(res.speedup("plan"), 3), noise_lo=round(lo, 3), noise_hi=round(hi, 3),
               p_faster=round(res.p_faster("plan"), 4), eager_ms=round(res.median_ms("baseline"), 3),
               plan_ms=round(res.median_ms("plan"), 3),
               verdict="holds (within noise)" if holds else
               ("over-stated" if row["recorded"] > hi else "under-stated"))
    return row


def write(rows: list[dict], out: Path) -> None:
    keys = ["plan", "label", "recorded", "measured", "noise_lo", "noise_hi", "p_faster", "eager_ms", "plan_ms",
            "rounds", "recorded_method", "recorded_env", "verdict", "load_before", "load_after"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fp = ""
    try:
        from autotiacc.hardware import fingerprint, fingerprint_id

        fp = fingerprint_id(fingerprint("cpu"))
    except Exception:  # noqa: BLE001
        pass
    lines = [f"# Fidelity of recorded speed-ups ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"Machine: {fp}. Each plan re-measured against eager fp32 in alternating fresh processes, "
             "default environment (`python experiments/fidelity.py`). Noise: lowest..highest per-round speed-up.",
             "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="run directories or plan files besides those under experiments/")
    ap.add_argument("--only", action="store_true", help="only the given paths, not every plan under experiments/")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "results" / "fidelity"))
    args = ap.parse_args()
    rows = []
    for path in find_plans(args.paths, only=args.only):
        row = check(path, rounds=args.rounds, window_s=args.window_s)
        print(row, flush=True)
        rows.append(row)
    write(rows, Path(args.out))


if __name__ == "__main__":
    main()
