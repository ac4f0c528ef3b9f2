"""OpenVINO as an engine (`autotiacc.engines.openvino`), its knob, and calibrated int8 through NNCF:
real OpenVINO and NNCF on tiny models (each build takes a second or two)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("openvino")

from autotiacc.knobs import SearchContext, config_from_dict, config_to_dict, configs_from_params, get_knob
from autotiacc.knobs.openvino import OpenVINOConfig

from .conftest import ROOT

TINY = '''
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

def example_inputs(batch_size: int = 2):
    return (torch.randn(batch_size, 3, 8, 8),)
'''
OPENVINO = {"execution": {"backend": "openvino"}}
INT8 = {"execution": {"backend": "openvino"}, "precision": {"mode": "int8_static"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("model") / "tiny.py"
    p.write_text(TINY)
    return p


def _evaluate(tiny: Path, values: dict, tolerance: float) -> dict:
    """One candidate as a trial evaluates it (build, accuracy guard on the test data, timing
    beside eager), in this process."""
    from autotiacc.inference.evaluate import evaluate
    from autotiacc.inference.workload import load_workload

    out = evaluate(load_workload(tiny), {"c": values}, tolerance=tolerance, target_s=0.05, warmup_s=0.05)
    return out["candidates"]["c"]


def _plan_with_artifact(tiny: Path, run: Path, values: dict) -> dict:
    from autotiacc.hardware import fingerprint
    from autotiacc.inference.artifacts import export_for_plan
    from autotiacc.inference.plan import Plan
    from autotiacc.inference.workload import load_workload

    wl = load_workload(tiny)
    run.mkdir(parents=True, exist_ok=True)
    # a recorded speed-up far below any run's: verify here checks the artifact and accuracy, not speed
    Plan(knobs=configs_from_params(values), fingerprint=fingerprint(),
         speedup=0.05, tolerance=0.2).save(run / "plan.json")
    return export_for_plan(run, wl)


# -- the engine: build, guard, artifact, verify ----------------------------------------------------------
def test_openvino_candidate_builds_passes_the_guard_and_its_ir_round_trips_through_verify(tiny, tmp_path):
    import torch

    import autotiacc
    from autotiacc.inference.verify import verify_plan
    from autotiacc.inference.workload import load_workload

    res = _evaluate(tiny, OPENVINO, tolerance=1e-4)
    assert res["status"] == "ok", res.get("reason")
    assert res["accuracy"]["rel_l2"] < 1e-5 and res["speedup"] > 0

    entry = _plan_with_artifact(tiny, tmp_path / "run", OPENVINO)
    assert entry["format"] == "openvino" and entry["file"] == "artifact.xml"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["artifact.bin", "artifact.xml", "plan.json"]
    assert set(entry["extra_files"]) == {"artifact.bin"} and len(entry["sha256"]) == 64
    assert config_from_dict(entry["engine_options"]) == OpenVINOConfig()
    wl = load_workload(tiny)
    x = wl.example_inputs()  # the shapes the IR was exported at
    assert torch.allclose(autotiacc.load_artifact(tmp_path / "run")(*x), wl.build_model()(*x), atol=1e-5)

    result = verify_plan(tmp_path / "run" / "plan.json", tiny, tolerance=0.5, measure_s=0.5)
    assert result.ok, result.problems
    assert any(line.startswith("artifact artifact.xml (openvino): sha256 ok") for line in result.lines), result.lines


def test_a_changed_ir_weights_file_is_refused_by_load_and_verify(tiny, tmp_path):
    import autotiacc
    from autotiacc.errors import PlanError
    from autotiacc.inference.verify import verify_plan

    run = tmp_path / "run"
    _plan_with_artifact(tiny, run, OPENVINO)
    weights = run / "artifact.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="artifact.bin: sha256 does not match"):
        autotiacc.load_artifact(run)
    result = verify_plan(run / "plan.json", tiny, tolerance=0.5, measure_s=0.3)
    assert not result.ok and any("artifact.bin" in p and "sha256" in p for p in result.problems), result.problems
    weights.unlink()
    with pytest.raises(PlanError, match="artifact.bin: missing beside artifact.xml"):
        autotiacc.load_artifact(run)
    with pytest.raises(PlanError, match="records no sha256 for artifact.bin"):  # the .xml's hash alone is not enough
        autotiacc.load_artifact(run / "artifact.xml", sha256=json.loads((run / "plan.json").read_text())
                                ["extra"]["artifact"]["sha256"])


def test_apply_and_the_artifact_compile_with_the_measured_options(tiny, tmp_path):
    """The knob's properties reach OpenVINO, in a plan's `apply` and in its artifact's `load`."""
    import autotiacc
    from autotiacc.inference.plan import load_plan

    from autotiacc.inference.workload import load_workload

    values = {**OPENVINO, "openvino": {"performance_hint": "THROUGHPUT", "num_streams": 2, "num_threads": 2}}
    _plan_with_artifact(tiny, tmp_path, values)
    wl = load_workload(tiny)
    applied = load_plan(tmp_path).apply(wl.build_model(), wl.example_inputs())
    served = autotiacc.load_artifact(tmp_path)
    for compiled in (applied._state.runner.compiled, served.compiled):
        assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
        assert int(compiled.get_property("NUM_STREAMS")) == 2
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")).endswith("'float32'>")


# -- calibrated int8 (NNCF) ------------------------------------------------------------------------------
def test_int8_static_builds_and_is_guarded(tiny):
    pytest.importorskip("nncf")
    ok = _evaluate(tiny, INT8, tolerance=0.2)
    assert ok["status"] == "ok", ok.get("reason")
    assert 1e-4 < ok["accuracy"]["rel_l2"] < 0.2  # int8's rounding is there, within the tolerance
    tight = _evaluate(tiny, INT8, tolerance=1e-6)
    assert tight["status"] == "rejected"
    assert "exceeds tolerance 1e-06" in tight["reason"]


def _fake_quantized_inputs(ov_model) -> set[str]:
    """Names of the Convolution/MatMul nodes that have an int8 FakeQuantize upstream of an input."""
    out = set()
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            for port in op.inputs():
                src = port.get_source_output().get_node()
                while src.get_type_name() in ("Reshape", "Convert", "Transpose"):
                    src = src.input_value(0).get_node()
                if src.get_type_name() == "FakeQuantize":
                    out.add(op.get_friendly_name())
    return out


def test_keep_fp32_groups_become_nncfs_ignored_scope_in_the_trial_and_the_artifact(tiny, tmp_path):
    """The profile's sensitive groups stay floating: NNCF inserts no quantizer before them, in the
    model a trial builds and in the IR a plan exports (where the model sits inside a wrapper)."""
    pytest.importorskip("nncf")
    import openvino as ov
    import torch

    from autotiacc.engines.openvino import convert, quantize

    ns: dict = {}
    exec(TINY, ns)
    model, x = ns["build_model"]().eval(), ns["example_inputs"]()
    batches = [(torch.randn_like(x[0]),) for _ in range(3)]
    every = _fake_quantized_inputs(quantize(convert(model, x), batches))
    assert {n.split("/")[0] for n in every} == {"__module.0", "__module.3"}
    kept = _fake_quantized_inputs(quantize(convert(model, x), batches, keep_fp32=("3",)))
    assert {n.split("/")[0] for n in kept} == {"__module.0"}

    _plan_with_artifact(tiny, tmp_path, {**INT8, "precision": {"mode": "int8_static", "groups": [["3", "fp32"]]}})
    saved = _fake_quantized_inputs(ov.Core().read_model(str(tmp_path / "artifact.xml")))
    assert {n.split("/")[0] for n in saved} == {"__module.model.0"}


def test_keep_fp32_groups_come_from_the_sensitivity_pass():
    from autotiacc.inference.static_int8 import keep_fp32_groups, kept_fp32

    sens = [{"path": "a", "sensitivity": {"bf16_autocast": {"ok": True}, "int8_dynamic": {"ok": False}}},
            {"path": "b", "sensitivity": {"bf16_autocast": {"ok": False}, "fp16_autocast": {"ok": False}}},
            {"path": "c", "sensitivity": {"bf16_autocast": {"ok": False}, "fp16_autocast": {"ok": True}}},
            {"path": "d", "sensitivity": {"fp16_autocast": {"ok": False, "reason": "far slower: 9x"}}},
            {"path": "e", "sensitivity": {"int8_dynamic": {"ok": True}, "bf16_autocast": {"ok": False}}},
            {"path": "f", "sensitivity": {}}]
    assert keep_fp32_groups(sens) == ["a", "b"]
    assert kept_fp32(sens) == ["a", "b"]  # no group checked in int8_static (no ONNX Runtime quantizer): these
    checked = sens + [{"path": "g", "sensitivity": {"int8_static": {"ok": False}}}]
    assert kept_fp32(checked) == ["g"]  # the per-group int8_static check decides where it ran


def test_calibration_takes_the_test_batches_the_fixed_shape_model_can_run():
    import torch

    from autotiacc.engines.openvino import calibration_batches
    from autotiacc.knobs import BuildState

    x = (torch.zeros(2, 3),)
    same, other, ints = (torch.ones(2, 3),), (torch.ones(1, 3),), (torch.ones(2, 3, dtype=torch.long),)
    state = BuildState(model=None, example_inputs=x, calibration=[same, other, ints, same])
    assert calibration_batches(state, x) == [same, same]
    assert calibration_batches(BuildState(model=None, example_inputs=x, calibration=[other]), x) == [x]
    assert calibration_batches(BuildState(model=None, example_inputs=x), x) == [x]


def test_apply_of_an_int8_static_plan_asks_for_its_calibration_data():
    import torch

    from autotiacc.inference.plan import Plan

    plan = Plan(knobs=configs_from_params(INT8))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="calibration_data="):
        plan.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fast = plan.apply(model, calibration_data=[(torch.randn(2, 4),) for _ in range(2)])
    assert len(fast._engine_inputs["calibration"]) == 2


# -- the knob and the search space -----------------------------------------------------------------------
def test_openvino_config_round_trips_and_validates():
    from autotiacc.errors import PlanError

    cfg = OpenVINOConfig(inference_precision="bf16", performance_hint="THROUGHPUT", num_streams=2, num_threads=3)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert cfg.properties() == {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT",
                                "NUM_STREAMS": "2", "INFERENCE_NUM_THREADS": "3"}
    assert OpenVINOConfig().properties() == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    with pytest.raises(ValueError, match="`inference_precision` got 'int8'.*int8_static"):
        OpenVINOConfig(inference_precision="int8")
    with pytest.raises(ValueError, match="`num_streams` got -1"):
        OpenVINOConfig(num_streams=-1)
    with pytest.raises(PlanError, match="`num_threads` got '2' \\(str\\), expected int"):
        config_from_dict({"_type": "OpenVINOConfig", "_version": 1, "_data": {"num_threads": "2"}})


def _ctx(flags=(), **kw) -> SearchContext:
    return SearchContext(cores=2, has_conv=True, extras={"cpu_flags": tuple(flags)}, **kw)


def test_bf16_is_offered_only_where_the_cpu_has_bf16_units():
    from autotiacc.engine.space import seeds
    from autotiacc.knobs import all_knobs
    from autotiacc.strategy import load_strategy

    knob, space = get_knob("openvino"), {"inference_precision": ["f32", "bf16"]}
    assert knob.choices("inference_precision", space, _ctx(["avx2", "fma"])) == ["f32"]
    assert knob.choices("inference_precision", space, _ctx(["avx512_bf16"])) == ["f32", "bf16"]
    assert knob.choices("inference_precision", space, _ctx(["amx_bf16"], level=0)) == ["f32"]
    strategy = load_strategy("inference-latency")

    def openvino_seeds(flags):
        return [s for s in seeds(strategy, all_knobs(), _ctx(flags)) if s.get("backend") == "openvino"]

    assert [s["openvino_inference_precision"] for s in openvino_seeds(["avx2"])] == ["f32", "f32"]  # f32, int8
    assert [s["openvino_inference_precision"] for s in openvino_seeds(["amx_bf16"])] == ["f32", "bf16", "f32"]


def test_openvino_options_are_sampled_only_for_openvino_candidates():
    import optuna

    from autotiacc.engine.space import sample
    from autotiacc.knobs import all_knobs
    from autotiacc.strategy import load_strategy

    strategy, ctx = load_strategy("inference-latency"), _ctx(["avx512_bf16"])
    study = optuna.create_study()
    study.enqueue_trial({"backend": "eager"})
    study.enqueue_trial({"backend": "openvino", "openvino_performance_hint": "THROUGHPUT"})
    eager = study.ask()
    configs = sample(eager, all_knobs(), strategy, ctx)
    assert configs["openvino"] == OpenVINOConfig() and not any(p.startswith("openvino_") for p in eager.params)
    ov_trial = study.ask()
    configs = sample(ov_trial, all_knobs(), strategy, ctx)
    assert configs["execution"].backend == "openvino" and configs["openvino"].performance_hint == "THROUGHPUT"
    assert {"openvino_inference_precision", "openvino_num_streams", "openvino_num_threads"} <= set(ov_trial.params)


def test_combinations_the_engine_cannot_run_are_refused_before_a_trial():
    ctx = _ctx()

    def reason(values):
        configs = configs_from_params(values)
        return next((r for name in ("precision", "openvino") if (r := get_knob(name).incompatible(configs, ctx))),
                    None)

    assert reason(OPENVINO) is None and reason(INT8) is None
    assert "does not carry into it" in reason({**OPENVINO, "precision": {"mode": "bf16_autocast"}})
    assert "channels_last" in reason({**OPENVINO, "layout": {"channels_last": True}})
    assert "num_threads" in reason({**OPENVINO, "runtime": {"threads": 1}})
    assert "quantizer (openvino" in reason({"precision": {"mode": "int8_static"}})


def test_openvino_is_a_fixed_shape_engine_for_traffic_buckets():
    from autotiacc.engines import fixed_shape_backends
    from autotiacc.inference.shapes.shape_tuning import FIXED_SHAPES, _runner_kind

    assert {"onnxruntime", "openvino"} <= fixed_shape_backends()
    assert _runner_kind({"backend": "openvino"}) == FIXED_SHAPES


def test_importing_autotiacc_imports_neither_openvino_nor_nncf():
    code = ("import sys, autotiacc, autotiacc.knobs, autotiacc.engines, autotiacc.inference.artifacts; "
            "autotiacc.engines.engines(); from autotiacc.knobs import SearchContext, get_knob; "
            "get_knob('execution').choices('backend', {'backend': ['eager', 'openvino']}, SearchContext()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('openvino', 'nncf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


ALTSTACK = '''
import gc, os, signal, torch
from autotiacc.inference.candidate import OptimizedModel
from autotiacc.knobs import configs_from_params
model, x = torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),)
first = OptimizedModel(model, configs_from_params({"execution": {"backend": "openvino"}}), example_inputs=x)
second = OptimizedModel(model, configs_from_params({"execution": {"backend": "openvino"}}), example_inputs=x)
del first; gc.collect()  # candidates dropped in the order they were built, not the reverse
del second; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: None)  # Python's handlers run on the thread's alternate stack
for _ in range(20):
    os.kill(os.getpid(), signal.SIGUSR1)
print("survived")
'''


def test_candidates_freed_in_any_order_leave_the_process_able_to_handle_signals():
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack per Core: with a Core per
    candidate, freeing two candidates in build order left a freed stack behind and the next
    handled signal killed the process with SIGSEGV (a worker between trials, or pytest itself)."""
    out = subprocess.run([sys.executable, "-c", ALTSTACK], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "survived", (out.returncode, out.stderr[-2000:])
