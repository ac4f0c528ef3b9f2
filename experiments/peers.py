"""The peers of bench_peers.py, each built the way a user builds it by hand with the engine's own
defaults (not autotiacc's knob recipes), and what one fresh process of a variant does.

    python experiments/peers.py SPEC.json     # one process: prepare a model, or time one variant

`prepare` (once per model, in its own process) builds the model with seed 0, draws the inputs,
runs eager fp32 on them (the reference) and writes what the engines load in production: the
ONNX export, ONNX Runtime's own int8 quantizations and the OpenVINO IR. `run_variant` (one
fresh process per variant per round) loads those, builds its peer, warms up, times one window
and checks its outputs against the reference. Optional packages are imported where used.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

# name -> what it is, in the table; the artifact it loads (made by `prepare`)
PEERS = {
    "eager": "eager fp32 (no_grad)",
    "torchscript": "TorchScript (trace + freeze)",
    "compile": "torch.compile (default)",
    "ort": "ONNX Runtime, its defaults",
    "ort-int8-static": "ORT int8 static (QDQ, quantize_static)",
    "ort-int8-dynamic": "ORT int8 dynamic (quantize_dynamic)",
    "openvino": "OpenVINO, its defaults",
    "openvino-f32": "OpenVINO f32 (INFERENCE_PRECISION_HINT)",
    "plan": "autotiacc plan",
}
ARTIFACTS = {"ort": "model.onnx", "ort-int8-static": "model.int8-static.onnx",
             "ort-int8-dynamic": "model.int8-dynamic.onnx", "openvino": "model.xml", "openvino-f32": "model.xml"}
REFERENCE = "reference.pt"
CHECK_SEEDS = (2, 3, 4)  # inputs the outputs are checked on; seed 1 draws the timed inputs
CALIBRATION_SEEDS = tuple(range(10, 18))


def load_model_file(path: str | Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(module) -> Any:
    """The model with the same random weights in every process (seed 0, nothing downloaded)."""
    import torch

    torch.manual_seed(0)
    return module.build_model().eval()


def draw_inputs(module, batch: int, seed: int) -> tuple:
    import torch

    torch.manual_seed(seed)
    x = module.example_inputs(batch_size=batch)
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# -- prepare: reference and artifacts, once per model ----------------------------------------------
def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Reference outputs and the artifacts `spec["variants"]` load, in `spec["work"]`; returns
    {artifact: "ok" or why it failed, "export": how the ONNX file was made}."""
    import torch

    module, work = load_model_file(spec["model_file"]), Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    model, batch = build(module), spec["batch"]
    inputs = draw_inputs(module, batch, 1)
    checks = [draw_inputs(module, batch, s) for s in CHECK_SEEDS]
    with torch.no_grad():
        refs = [model(*x) for x in checks]
    torch.save({"inputs": inputs, "checks": checks, "refs": refs}, work / REFERENCE)
    wanted = set(spec["variants"])
    notes: dict[str, Any] = {}
    if wanted & {"ort", "ort-int8-static", "ort-int8-dynamic"}:
        notes.update(_onnx_artifacts(model, inputs, module, batch, work, wanted))
    if wanted & {"openvino", "openvino-f32"}:
        notes["openvino"] = _attempt(lambda: _openvino_ir(model, inputs, work))
    return notes


def _attempt(step: Callable[[], Any]) -> str:
    try:
        out = step()
        return out if isinstance(out, str) else "ok"
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is a result, the others go on
        return f"failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _onnx_artifacts(model, inputs, module, batch: int, work: Path, wanted: set[str]) -> dict[str, str]:
    import torch

    onnx_path = work / ARTIFACTS["ort"]

    def export() -> str:
        try:  # torch.onnx.export's defaults, as a user calls it
            torch.onnx.export(model, inputs, str(onnx_path))
            return "ok: torch.onnx.export defaults"
        except Exception as exc:  # noqa: BLE001 - then the exporter users fall back to
            torch.onnx.export(model, inputs, str(onnx_path), dynamo=False)
            return f"ok: dynamo=False (the default exporter raised {type(exc).__name__})"

    notes = {"export": _attempt(export)}
    if not onnx_path.is_file():
        return notes
    if "ort-int8-static" in wanted:
        calib = [draw_inputs(module, batch, s) for s in CALIBRATION_SEEDS]
        notes["ort-int8-static"] = _attempt(lambda: _ort_static(onnx_path, work / ARTIFACTS["ort-int8-static"], calib))
    if "ort-int8-dynamic" in wanted:
        from onnxruntime.quantization import quantize_dynamic

        notes["ort-int8-dynamic"] = _attempt(
            lambda: quantize_dynamic(str(onnx_path), str(work / ARTIFACTS["ort-int8-dynamic"])))
    return notes


def _ort_static(onnx_path: Path, out: Path, calib: list[tuple]) -> str:
    """ONNX Runtime's static quantizer as its documentation runs it: pre-processing, then
    quantize_static in QDQ format with a calibration reader on the model's example inputs."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in ort.InferenceSession(str(onnx_path)).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([dict(zip(names, (t.numpy() for t in x))) for x in calib])

        def get_next(self):
            return next(self.batches, None)

    pre, note = onnx_path.with_suffix(".pre.onnx"), "ok"
    try:
        quant_pre_process(str(onnx_path), str(pre))
    except Exception as exc:  # noqa: BLE001 - pre-processing is advised, not required
        pre, note = onnx_path, f"ok (without pre-processing: {type(exc).__name__})"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ)
    return note


def _openvino_ir(model, inputs, work: Path) -> None:
    """`openvino.convert_model`, saved as IR without compressing weights to fp16 (save_model's
    default would change the model the timed processes load)."""
    import openvino as ov

    ov.save_model(ov.convert_model(model, example_input=inputs), str(work / ARTIFACTS["openvino"]),
                  compress_to_fp16=False)


# -- one variant's process -----------------------------------------------------------------------
def _torch_runner(fn) -> Callable[[tuple], Callable[[], Any]]:
    import torch

    def make(x: tuple) -> Callable[[], Any]:
        def call():
            with torch.no_grad():
                return fn(*x)
        return call
    return make


def _ort_runner(path: Path) -> Callable[[tuple], Callable[[], Any]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))  # its defaults: no options, no provider list
    names = [i.name for i in session.get_inputs()]

    def make(x: tuple) -> Callable[[], Any]:
        feeds = dict(zip(names, (t.numpy() for t in x)))
        return lambda: session.run(None, feeds)[0]
    return make


def _openvino_runner(path: Path, config: dict[str, str]) -> Callable[[tuple], Callable[[], Any]]:
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", config)

    def make(x: tuple) -> Callable[[], Any]:
        feeds = [t.numpy() for t in x]
        return lambda: compiled(feeds)[0]
    return make


def build_variant(name: str, model, inputs: tuple, work: Path, plan_path: str | None):
    """`make(inputs) -> call()`: the peer `name` ready to run one batch per call."""
    import torch

    if name == "eager":
        return _torch_runner(model)
    if name == "torchscript":
        with torch.no_grad():
            return _torch_runner(torch.jit.freeze(torch.jit.trace(model, inputs)))
    if name == "compile":
        return _torch_runner(torch.compile(model))
    if name in ("ort", "ort-int8-static", "ort-int8-dynamic"):
        return _ort_runner(work / ARTIFACTS[name])
    if name in ("openvino", "openvino-f32"):
        return _openvino_runner(work / ARTIFACTS[name], {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32") else {})
    if name == "plan":
        from autotiacc import load_plan

        return _torch_runner(load_plan(plan_path).apply(model, inputs))
    raise ValueError(f"unknown peer {name!r}: use one of {', '.join(PEERS)}")


def time_window(call: Callable[[], Any], *, warmup_s: float, window_s: float, min_calls: int = 3) -> dict[str, Any]:
    """Warm-up (at least 2 calls, the first timed alone: compiles run there), then one window of
    calls for `window_s` (at least `min_calls`)."""
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    n, t_end = 1, time.perf_counter() + warmup_s
    while n < 2 or time.perf_counter() < t_end:
        call()
        n += 1
    samples: list[float] = []
    t_end = time.perf_counter() + window_s
    while len(samples) < min_calls or time.perf_counter() < t_end:
        t = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t) * 1e3)
    return {"first_call_s": first_s, "warmup_calls": n, "samples_ms": samples}


def rel_l2(outputs: list[Any], refs: list[Any]) -> float:
    """The worst relative L2 error over the check inputs (autotiacc's guard measure)."""
    import torch

    from autotiacc.inference.accuracy import compare_outputs

    got = [torch.as_tensor(o) if not isinstance(o, torch.Tensor) else o for o in outputs]
    report = compare_outputs(got, refs, tolerance=float("inf"))
    return report.rel_l2 if report.ok else float("inf")


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: build the peer, warm up, time one window, check its outputs."""
    import os

    import torch

    from autotiacc.engine.fidelity import measured_env

    work = Path(spec["work"])
    ref = torch.load(work / REFERENCE)
    model = build(load_model_file(spec["model_file"]))
    t0 = time.perf_counter()
    make = build_variant(spec["variant"], model, ref["inputs"], work, spec.get("plan"))
    build_s = time.perf_counter() - t0
    timing = time_window(make(ref["inputs"]), warmup_s=spec["warmup_s"], window_s=spec["window_s"])
    err = rel_l2([make(x)() for x in ref["checks"]], ref["refs"])
    return {"pid": os.getpid(), "build_s": build_s, "rel_err": err, "torch_threads": torch.get_num_threads(),
            "env": measured_env(), **timing}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["result"])
    try:
        result = {"status": "ok", **(prepare(spec) if spec.get("prepare") else run_variant(spec))}
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the benchmark goes on
        import traceback

        result = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).strip()[:400]}",
                  "traceback": traceback.format_exc()[-3000:]}
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
