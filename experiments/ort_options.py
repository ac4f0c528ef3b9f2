"""Why ONNX Runtime's spinning is judged only in the final, and what reusing builds saves.

1. Interleaved, in ONE process (as a search trial times a candidate beside the eager baseline):
   the eager model's median while it takes turns with an ORT session whose pool threads do not
   spin, and with one whose threads spin (ORT's default).
2. Alone, each variant in its own fresh process, windows in turns (as the final and `verify`
   time them, `engine.fidelity.measure_alternating`): ORT without and with spinning.
3. Builds in one warm worker (`inference.evaluate`): build seconds of ORT candidates that share
   one export (other session options, int8_static twice), and the seconds reuse saved.

    python experiments/ort_options.py --model examples/convnet.py --batch-size 8

Prints a markdown report (with the load average before and after: figures taken beside other
work are not results) and writes it to experiments/results/ort_options/<fingerprint>-<time>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from autotiacc.engine.fidelity import measure_alternating  # noqa: E402
from autotiacc.hardware import fingerprint, fingerprint_id  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402

ORT = {"execution": {"backend": "onnxruntime"}}
SPIN = {**ORT, "ort": {"spinning": True}}


def interleaved(workload, rounds: int) -> dict[str, float]:
    """Median ms of eager beside ORT (spinning off, on), and of each ORT session, in this process."""
    import torch

    from autotiacc.inference.candidate import OptimizedModel
    from autotiacc.knobs import configs_from_params
    from autotiacc.measure import measure_interleaved

    model, x = workload.build_model(), workload.example_inputs()
    out: dict[str, float] = {}
    for name, values in (("no spinning", ORT), ("spinning", SPIN)):
        cand = OptimizedModel(model, configs_from_params(values), example_inputs=x)
        with torch.no_grad():
            t = measure_interleaved({"eager": lambda: model(*x), "ort": lambda cand=cand: cand(*x)}, "cpu",
                                    min_rounds=rounds, max_rounds=rounds, target_s=0.0, warmup_s=1.0)
        out[f"eager beside ORT ({name})"] = t["eager"].median
        out[f"ORT ({name}), interleaved"] = t["ort"].median
        del cand
    return out


def alone(workload, rounds: int) -> dict[str, float]:
    res = measure_alternating(workload, {"ORT (no spinning), alone": ORT, "ORT (spinning), alone": SPIN},
                              rounds=rounds, window_s=0.5, warmup_s=1.0, tolerance=0.05)
    return {n: statistics.median(w) for n, w in res.windows.items() if n != "baseline"} | {
        "eager, alone": statistics.median(res.windows["baseline"])}


def builds(workload) -> list[tuple[str, float, float]]:
    from autotiacc.inference.evaluate import evaluate

    variants = {"ORT fp32": ORT, "ORT fp32, parallel mode": {**ORT, "ort": {"execution_mode": "parallel"}},
                "ORT int8_static": {**ORT, "precision": {"mode": "int8_static"}},
                "ORT int8_static, 1 thread": {**ORT, "precision": {"mode": "int8_static"}, "runtime": {"threads": 1}}}
    out = []
    for name, values in variants.items():  # one candidate per call, as trials come
        r = evaluate(workload, {name: values}, device="cpu", tolerance=0.05, target_s=0.2, warmup_s=0.2)
        r = r["candidates"][name]
        out.append((name, r.get("build_s") or 0.0, (r.get("trial_attrs") or {}).get("reused_s", 0.0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE.parent / "examples" / "convnet.py"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    workload = load_workload(args.model, batch_size=args.batch_size)
    load0 = os.getloadavg()
    inter, solo, built = interleaved(workload, args.rounds), alone(workload, 6), builds(workload)
    load1 = os.getloadavg()
    fp = fingerprint("cpu")
    lines = [f"# ONNX Runtime options: {Path(args.model).name}, batch {args.batch_size}", "",
             f"- machine: {fp['cpu_model']}, {fp['cpu_count']} cores, flags {' '.join(fp['cpu_flags'])}; "
             f"onnxruntime {fp.get('onnxruntime')}, torch {fp['torch']}",
             f"- load average (1, 5, 15 min) before: {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}; after: "
             f"{load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f} (above the core count: other work ran beside it)", "",
             "| timing | median ms |", "| --- | --- |"]
    lines += [f"| {n} | {v:.2f} |" for n, v in {**inter, **solo}.items()]
    lines += ["", "| build in one worker | build s | reuse saved s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {b:.2f} | {r:.2f} |" for n, b, r in built]
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results" / "ort_options" / f"{fingerprint_id(fp)}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
