"""How often does a 2-rank gloo DDP job hang at teardown? (the CI hang of stop 16)

Each iteration starts 2 real ranks (autotiacc's rank launcher: forked workers, gloo), wraps a
one-layer model in DDP with a gradient-compression hook, runs one backward, calls
`destroy_process_group()` while the model still lives, and returns: the model is dropped last,
as when a training function ends. torch's reducer then releases the process group's last
reference and joins gloo's threads while holding the GIL, and a gloo thread that is still
releasing a completed future's callback (a Python object) waits for the GIL: a deadlock
(pytorch#56297). An iteration with no result within `--timeout` counts as a hang.

    python experiments/ddp_teardown.py --iters 150 --load 2

`--load N` runs N busy processes beside it (a CI machine running other tests); the race is
rarer on an idle machine. Writes experiments/results/<fingerprint>/ddp_teardown-<time>.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.training.launch import run_ranks  # noqa: E402

VARIANTS = {
    "torch DDP, fp16 Python hook": "python-hook",
    "torch DDP, fp16 C++ hook": "builtin-hook",
    "autotiacc DistributedDataParallel, fp16 (plan)": "autotiacc",
    "autotiacc DistributedDataParallel, PowerSGD (plan)": "autotiacc-powersgd",
}


def one_job(variant: str) -> list:
    """In each rank: DDP, one backward, destroy_process_group(), return (the model dropped last)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    from autotiacc.training import DDPConfig, DistributedDataParallel

    dist.init_process_group("gloo")
    model = torch.nn.Linear(4, 1, bias=False)
    if variant.startswith("autotiacc"):
        hook = "powersgd" if variant.endswith("powersgd") else "fp16"
        ddp = DistributedDataParallel(model, plan=DDPConfig(comm_hook=hook, gradient_as_bucket_view=True))
    else:
        ddp = TorchDDP(model, gradient_as_bucket_view=True)
        if variant == "python-hook":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    ddp(torch.full((1, 4), float(dist.get_rank() + 1))).sum().backward()
    grad = model.weight.grad.tolist()
    dist.destroy_process_group()
    return grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--load", type=int, default=2, help="busy processes beside the jobs")
    ap.add_argument("--timeout", type=float, default=12.0)
    ap.add_argument("--only", nargs="*", help="variant keys: " + ", ".join(VARIANTS.values()))
    args = ap.parse_args()
    fp = fingerprint("cpu")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    rows = []
    try:
        for label, key in VARIANTS.items():
            if args.only and key not in args.only:
                continue
            counts = {"ok": 0, "hang": 0, "other": 0}
            t0 = time.perf_counter()
            for _ in range(args.iters):
                overall, _ = run_ranks(one_job, 2, key, timeout=args.timeout)
                counts["ok" if overall.ok else "hang" if overall.status == "timeout" else "other"] += 1
            row = {"variant": label, "iters": args.iters, **counts, "load_procs": args.load,
                   "seconds": round(time.perf_counter() - t0, 1), "loadavg": round(os.getloadavg()[0], 2)}
            print(row, flush=True)
            rows.append(row)
    finally:
        for p in busy:
            p.kill()
    out = HERE / "results" / fingerprint_id(fp) / f"ddp_teardown-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} (torch {__import__('torch').__version__}, {fp.get('cpu_model')})")


if __name__ == "__main__":
    main()
