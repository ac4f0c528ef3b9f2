"""How much of a CPU latency is the memory allocator's? Each variant timed alone in fresh
processes, taken in turns, under glibc's default malloc and with its mmap threshold fixed high.

glibc serves blocks above a threshold (128 KiB at start, raised as big blocks are freed, up to
32 MiB) with mmap and returns them with munmap: a forward whose activations are such blocks
pays fresh page faults on every call, and how often depends on the process's allocation
history so far (a per-process "personality"). Fixing the threshold (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, read when the process starts) keeps them in the heap.

    python experiments/allocator.py --model examples/convnet.py --batch-size 8 --reps 6

Writes experiments/results/<fingerprint>/allocator-<time>.csv and a plot, and prints a table.
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

from autotiacc.engine.workers import run_isolated  # noqa: E402
from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402

# a setting: (environment of the fresh process, mallopt calls made once the variant is built and warm)
SETTINGS = {"glibc default": ({}, ()),
            "mmap threshold fixed (1 GiB)": ({"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                              "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}, ()),
            # what a plan's `apply` could do in a serving process that has loaded its model already:
            # mallopt's ceiling for the mmap threshold is 32 MiB on 64-bit glibc
            "mallopt at run time (32 MiB / 1 GiB)": ({}, ((-3, 32 << 20), (-1, 1 << 30)))}
VARIANTS = {"eager fp32": None, "torchscript fp32": {"execution": {"backend": "torchscript"}},
            "torchscript bf16 weights channels_last": {"execution": {"backend": "torchscript"},
                                                       "precision": {"mode": "bf16_weights"},
                                                       "layout": {"channels_last": True}},
            "compile bf16 autocast (freezing)": {"execution": {"backend": "compile", "freezing": True},
                                                 "precision": {"mode": "bf16_autocast"}}}


def time_variant(workload, values, window_s: float, mallopt: tuple = ()) -> dict:
    """In the child: build, warm up, make the `mallopt` calls (M_* number, value), time one
    window; minor page faults per call while timing."""
    import ctypes
    import resource

    from autotiacc.engine.fidelity import time_window

    time_window(workload, "v", values, device="cpu", window_s=0, warmup_s=1.0, tolerance=1.0)
    libc = ctypes.CDLL("libc.so.6")
    for param, value in mallopt:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) refused")
    if mallopt:  # settle at the new thresholds before timing
        time_window(workload, "v", values, device="cpu", window_s=0.3, warmup_s=0, tolerance=1.0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = time_window(workload, "v", values, device="cpu", window_s=window_s, warmup_s=0, tolerance=1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"median_ms": statistics.median(out["samples_ms"]), "faults_per_call": faults / len(out["samples_ms"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="examples/convnet.py")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6, help="fresh processes per variant and setting")
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--settings", nargs="*", choices=list(SETTINGS), help="default: all")
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants or VARIANTS}
    settings = {s: SETTINGS[s] for s in args.settings or SETTINGS}
    workload = load_workload(Path(args.model), batch_size=args.batch_size)
    fp = fingerprint("cpu")
    out_dir = HERE / "results" / fingerprint_id(fp)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(args.reps):  # in turns, the order rotating, so drift in load hits all alike
        cells = [(s, v) for s in settings for v in variants]
        k = rep % len(cells)
        for setting, variant in cells[k:] + cells[:k]:
            env, mallopt = settings[setting]
            res = run_isolated(time_variant, workload, variants[variant], args.window_s, mallopt, timeout=300,
                               env=env)
            row = {"rep": rep, "setting": setting, "variant": variant, "ok": res.ok,
                   "load": round(os.getloadavg()[0], 2), **(res.value if res.ok else {"error": res.error[:200]})}
            rows.append(row)
            print(row, flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"allocator-{stamp}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    table = {}
    for s in settings:
        for v in variants:
            ms = [r["median_ms"] for r in rows if r["setting"] == s and r["variant"] == v and r["ok"]]
            pf = [r["faults_per_call"] for r in rows if r["setting"] == s and r["variant"] == v and r["ok"]]
            if ms:
                table[(s, v)] = (statistics.median(ms), min(ms), max(ms), statistics.median(pf))
    print(f"\n{args.model} bs {args.batch_size}, {args.reps} fresh processes each, {fingerprint_id(fp)}")
    print("| setting | variant | median ms (min-max over processes) | page faults per call |\n|---|---|---|---|")
    for (s, v), (med, lo, hi, pf) in table.items():
        print(f"| {s} | {v} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {pf:.0f} |")
    from autotiacc.report.plotting import figure

    with figure(out_dir / f"allocator-{stamp}.png", title=f"{Path(args.model).name} bs {args.batch_size}: "
                "latency per fresh process", xlabel="ms (each dot a process)", size=(8, 3.5)) as ax:
        labels = list(table)
        for i, (s, v) in enumerate(labels):
            ms = [r["median_ms"] for r in rows if r["setting"] == s and r["variant"] == v and r["ok"]]
            ax.plot(ms, [i] * len(ms), "o", alpha=0.6)
        ax.set_yticks(range(len(labels)), [f"{v}\n{s}" for s, v in labels], fontsize=7)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
