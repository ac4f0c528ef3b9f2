"""Write hand-made schema-2 traffic plans for examples/text_encoder_traffic.py, to time with
bench_traffic.py what per-bucket configs can express when a short tune on a loaded machine
cannot search far (issue 12: bf16 weights on the long requests; a static-shape ONNX Runtime
session per bucket):

  torchscript  - one shared TorchScript fp32 runner (what the issue-5 tune found)
  split_bf16   - TorchScript fp32 up to 64 tokens, eager bf16 weights above (unpadded)
  ort_static   - an ONNX Runtime fp32 session per bucket, each exported at its fixed shape

    python experiments/traffic_hand_plans.py OUT_DIR
    python experiments/bench_traffic.py examples/text_encoder_traffic.py OUT_DIR/split_bf16.json
"""
from __future__ import annotations

import sys
from pathlib import Path

from autotiacc.hardware import fingerprint
from autotiacc.inference.shapes.buckets import ShapePlan, spec_from_values
from autotiacc.inference.plan import Plan
from autotiacc.inference.shapes.shape_tuning import shape_tuning_for
from autotiacc.inference.shapes.traffic import traffic_to_rows
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import configs_from_params

TS = {"execution": {"backend": "torchscript"}}
BF16 = {"execution": {"backend": "eager"}, "precision": {"mode": "bf16_weights"}}
ORT = {"execution": {"backend": "onnxruntime"}}
PLANS = {
    "torchscript": (TS, {"edges": {"batch_size": [4], "seq_len": [250]}, "padded": [False], "knobs": [{}]}),
    "split_bf16": (TS, {"edges": {"batch_size": [4], "seq_len": [64, 250]}, "padded": [False, False],
                        "knobs": [{}, BF16]}),
    "ort_static": (ORT, {"edges": {"batch_size": [1, 2, 4], "seq_len": [24, 64, 128, 250]}, "padded": [True] * 12,
                         "knobs": [{}] * 12}),
}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    w = load_workload(Path(__file__).parents[1] / "examples" / "text_encoder_traffic.py")
    st = shape_tuning_for(w)
    for name, (knobs, shapes) in PLANS.items():
        spec = spec_from_values(shapes, st.axes)
        plan = Plan(knobs=configs_from_params(knobs), fingerprint=fingerprint("cpu"), workload=w.identity(),
                    tolerance=2e-2, note=f"hand-made plan `{name}` (experiments/traffic_hand_plans.py), not tuned",
                    shapes=ShapePlan(spec, traffic=traffic_to_rows(st.traffic)))
        print(plan.save(out / f"{name}.json"), plan.label)


if __name__ == "__main__":
    main()
