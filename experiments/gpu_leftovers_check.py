"""On a CUDA machine: what issue 11's leftovers built on CPU only, checked in one short run.

    python experiments/gpu_leftovers_check.py [OUT_DIR]     # default /tmp/gpu-leftovers

1. Artifacts of CUDA-graph plans (`examples/convnet.py`, bs 1): each is exported, loaded with
   `load_artifact` (which captures the graph again), checked against eager fp32 and timed
   interleaved with the plan it came from.
2. A traffic tune's trial on CUDA (`examples/text_encoder_traffic.py`): the bucketed candidates
   run with model and inputs on the GPU, accuracy checked over the mix.
3. int8 weights on CUDA (`examples/transformer.py`): `int8_weights` (torchao) eager and compiled,
   error vs fp32 and timing interleaved with fp32 eager.

One JSON line per result; quote them with the GPU's name. Not run in CI (no GPU there).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotiacc import load_artifact  # noqa: E402
from autotiacc.inference.artifacts import export_for_plan  # noqa: E402
from autotiacc.inference.candidate import OptimizedModel  # noqa: E402
from autotiacc.inference.plan import Plan  # noqa: E402
from autotiacc.inference.shapes.shape_tuning import shape_tuning_for  # noqa: E402
from autotiacc.inference.workload import load_workload  # noqa: E402
from autotiacc.knobs import configs_from_params  # noqa: E402
from autotiacc.measure import measure_interleaved  # noqa: E402


def say(**kw) -> None:
    print(json.dumps(kw, default=str), flush=True)


def rel_l2(out, ref) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / (ref.norm() + 1e-12))


def timed(runners: dict) -> None:
    for n, t in measure_interleaved(runners, "cuda", min_rounds=30, target_s=3.0, warmup_s=1.0).items():
        say(variant=n, median_ms=round(t.median, 4), spread=round(t.iqr_rel, 3))


def artifacts(out: Path) -> None:
    w = load_workload(ROOT / "examples" / "convnet.py", batch_size=1)
    x = tuple(t.cuda() for t in w.example_inputs())
    ref = w.build_model().eval().cuda()(*x)
    runners = {}
    for backend in ("eager", "torchscript"):
        values = {"execution": {"backend": backend, "cuda_graphs": True}, "precision": {"mode": "fp16_weights"},
                  "layout": {"channels_last": True}}
        d = out / f"art-{backend}"
        d.mkdir(parents=True, exist_ok=True)
        plan = Plan(knobs=configs_from_params(values), device="cuda")
        plan.save(d / "plan.json")
        try:
            entry = export_for_plan(d, w)
            art = load_artifact(d)
            say(artifact=backend, format=entry["format"], cuda_graphs=entry.get("cuda_graphs"),
                runner=type(art).__name__, rel_l2=rel_l2(art(*x), ref), graphs=getattr(art, "graphs", None))
            runners[f"{backend}_artifact"] = lambda a=art: a(*x)
            live = plan.apply(w.build_model(), x)
            runners[f"{backend}_plan"] = lambda p=live: p(*x)
        except Exception as exc:  # noqa: BLE001 - a failure is a result here
            say(artifact=backend, error=f"{type(exc).__name__}: {exc}"[:400])
    timed(runners)


def traffic() -> None:
    w = load_workload(ROOT / "examples" / "text_encoder_traffic.py")
    st = shape_tuning_for(w)
    fn, kw = st.evaluator(final=True)
    kw["rounds"] = 5
    edges = {n: sorted(set(st.hist[n]))[-1:] for n in st.names}
    cands = {"shared_eager_fp16": {"precision": {"mode": "fp16_weights"}},
             "padded_ts_graphs": {"execution": {"backend": "torchscript", "cuda_graphs": True},
                                  "shapes": {"edges": edges, "padded": [True], "knobs": [{}]}}}
    res = fn(w, cands, device="cuda", **kw)
    for n, r in res["candidates"].items():
        say(traffic=n, status=r["status"], reason=r.get("reason"), speedup=r.get("speedup"),
            rel_l2=(r.get("accuracy") or {}).get("rel_l2"))


def int8() -> None:
    w = load_workload(ROOT / "examples" / "transformer.py", batch_size=1)
    model = w.build_model().eval().cuda()
    x = tuple(t.cuda() for t in w.example_inputs())
    with torch.no_grad():
        ref = model(*x)
    runners = {"fp32_eager": lambda: model(*x)}
    for backend in ("eager", "compile"):
        try:
            opt = OptimizedModel(model, configs_from_params({"precision": {"mode": "int8_weights"},
                                                             "execution": {"backend": backend}}),
                                 example_inputs=x, device="cuda")
            say(int8_weights=backend, rel_l2=rel_l2(opt(*x), ref), build_s=round(opt.build_seconds, 2))
            runners[f"int8_weights_{backend}"] = lambda o=opt: o(*x)
        except Exception as exc:  # noqa: BLE001
            say(int8_weights=backend, error=f"{type(exc).__name__}: {exc}"[:400])
    timed(runners)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-leftovers")
    say(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    for part in (artifacts, traffic, int8):
        try:
            part() if part is not artifacts else part(out)
        except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others
            say(part=part.__name__, error=f"{type(exc).__name__}: {exc}"[:400])


if __name__ == "__main__":
    main()
