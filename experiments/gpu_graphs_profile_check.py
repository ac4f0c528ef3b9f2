"""On a CUDA machine: the CUDA-graph runners and the attributed profile, checked in one short run.

    python experiments/gpu_graphs_profile_check.py [MODEL_PY] [BATCH]   # default examples/convnet.py 1

For eager and TorchScript, fp32 and fp16 + channels_last, with and without `cuda_graphs`, it
builds the candidate exactly as a plan does, checks the output against eager fp32 (relative L2)
and times all variants interleaved (median ms, CUDA events). Then it profiles the model and
prints `shares_sum` (the module self-time shares as a fraction of the plain forward; the goal is
0.95-1.05), the profiler overhead and the diagnosis. One JSON line per result; quote them with
the GPU's name. Not run in CI (no GPU there).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotiacc.inference.candidate import OptimizedModel  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402
from autotiacc.knobs import configs_from_params  # noqa: E402
from autotiacc.measure import measure_interleaved  # noqa: E402
from autotiacc.profiling.forward import profile_model  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    model_py = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "examples" / "convnet.py")
    bs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    w = load_workload(model_py, batch_size=bs)
    model = w.build_model().eval().to("cuda")
    inputs = tuple(t.to("cuda") for t in w.example_inputs())
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": model_py, "bs": bs}))
    with torch.no_grad():
        ref = model(*inputs).float()
    variants = {}
    for backend in ("eager", "torchscript"):
        for low in (False, True):
            for graphs in (False, True):
                params = {"execution": {"backend": backend, "cuda_graphs": graphs}}
                if low:
                    params.update(precision={"mode": "fp16_weights"}, layout={"channels_last": True})
                name = f"{backend}{'_fp16_cl' if low else '_fp32'}{'_graphs' if graphs else ''}"
                try:
                    opt = OptimizedModel(model, configs_from_params(params), example_inputs=inputs, device="cuda")
                    out = opt(*inputs).float()
                    err = float((out - ref).norm() / (ref.norm() + 1e-12))
                    variants[name] = opt
                    print(json.dumps({"variant": name, "build_s": round(opt.build_seconds, 2), "rel_l2": err}))
                except Exception as exc:  # noqa: BLE001 - a failure is a result here
                    print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}))
    timings = measure_interleaved({n: (lambda o=o: o(*inputs)) for n, o in variants.items()}, "cuda",
                                  min_rounds=30, target_s=5.0, warmup_s=1.0)
    for n, t in timings.items():
        print(json.dumps({"variant": n, "median_ms": round(t.median, 4), "spread": round(t.iqr_rel, 3)}))
    prof = profile_model(model, inputs, device="cuda", target_s=2.0)
    print(json.dumps({"profile": {k: prof.get(k) for k in ("shares_sum", "timer_overhead", "idle_scale", "busy_ms",
                                                           "device_events_per_forward", "nvtx")},
                      "forward_ms": prof["forward"]["median_ms"], "diagnosis": prof["diagnosis"],
                      "gpu": prof.get("gpu"), "groups": [g["path"] for g in prof["groups"]]}, default=str))


if __name__ == "__main__":
    main()
