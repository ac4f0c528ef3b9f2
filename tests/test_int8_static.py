"""Calibrated static int8 by ONNX Runtime's QDQ quantizer (precision mode `int8_static`): it is
offered only with an engine that has a static quantizer, builds with scales calibrated on the
test data, goes through the trial's accuracy guard (passes on a tolerant model, rejected with
its reason when a layer breaks it), keeps in fp32 the groups the sensitivity pass saw break
alone, and `plan.apply` and the exported artifact run the scales that were measured."""
from __future__ import annotations

import dataclasses
import json
import re

import onnx
import optuna
import pytest
import torch

from autotiacc.engines.ort_int8 import QuantSettings, module_path, nodes_under
from autotiacc.errors import PlanError
from autotiacc.inference.evaluate import evaluate
from autotiacc.inference.layer_precision import CHECKS
from autotiacc.profiling.sensitivity import analyse_sensitivity
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.static_int8 import kept_fp32
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import PrecisionConfig, SearchContext, config_from_dict, config_to_dict, configs_from_params, get_knob

from .conftest import MODELS

OUTLIER = MODELS / "int8_outlier.py"
CPU = SearchContext(device="cpu", level=1, onnxruntime=True, has_linear=True)
OPENVINO_QUANTIZES = get_knob("openvino").applies(CPU)  # OpenVINO installed: its NNCF builds int8_static too


def _static(groups=()) -> dict:
    return {"execution": {"backend": "onnxruntime"}, "precision": {"mode": "int8_static", "groups": list(groups)}}


def _evaluate(path, values, tolerance) -> dict:
    w = load_workload(path)
    return evaluate(w, {"c": values}, device="cpu", tolerance=tolerance, target_s=0.05, warmup_s=0.02)["candidates"]["c"]


def test_int8_static_builds_calibrated_and_passes_the_guard_on_a_tolerant_model():
    r = _evaluate(MODELS / "tiny_mlp.py", _static(), tolerance=0.1)
    assert r["status"] == "ok", r.get("reason")
    assert 0 < r["accuracy"]["rel_l2"] < 0.1  # rounded, and near fp32
    record = r["trial_attrs"]["int8_static"]
    assert record["calibrated_on"] == "4 batches"  # the workload's test data (seeded example inputs here)
    assert record["settings"] == dataclasses.asdict(QuantSettings.for_this_cpu())
    assert record["settings"]["activation_type"] == "QUInt8" and record["settings"]["per_channel"]


def test_a_layer_that_breaks_int8_is_rejected_by_the_guard_with_the_reason():
    r = _evaluate(OUTLIER, _static(), tolerance=0.05)
    assert r["status"] == "rejected" and "exceeds tolerance 0.05" in r["reason"]
    assert r["accuracy"]["rel_l2"] > 0.1


def test_sensitivity_keeps_the_breaking_layer_fp32_and_the_rest_passes():
    """The profile's groups, each quantized alone: `spiky.lin` breaks the tolerance and is kept
    in fp32 (with the Mul that feeds it, which the exporter put in its parent's scope); the
    candidate the precision knob then proposes passes the guard."""
    w = load_workload(OUTLIER)
    groups = [{"path": p, "type": "Linear", "inclusive_share": s, "linear": True}
              for p, s in (("smooth.0", 0.4), ("spiky.lin", 0.2), ("head", 0.1))]
    sens = analyse_sensitivity(w, groups, checks=CHECKS, modes=["int8_static"], tolerance=0.05)
    by = {g["path"]: g["sensitivity"]["int8_static"] for g in sens}
    assert not by["spiky.lin"]["ok"] and "exceeds tolerance" in by["spiky.lin"]["reason"]
    assert by["smooth.0"]["ok"] and by["head"]["ok"]
    assert all("int8_static" not in g["allowed"] for g in sens)  # checked, never a per-group Optuna choice
    assert kept_fp32(sens) == ["spiky.lin"]
    study = optuna.create_study()
    study.enqueue_trial({"mode": "int8_static"})
    ctx = SearchContext(**{**CPU.__dict__, "extras": {"int8_static_fp32": kept_fp32(sens)}})
    cfg = get_knob("precision").suggest(study.ask(), {"mode": ["fp32", "int8_static"]}, ctx)
    assert cfg == PrecisionConfig(mode="int8_static", groups=(("spiky.lin", "fp32"),))
    r = _evaluate(OUTLIER, {"execution": {"backend": "onnxruntime"}, "precision": config_to_dict(cfg)["_data"]},
                  tolerance=0.05)
    assert r["status"] == "ok", r.get("reason")
    assert r["trial_attrs"]["int8_static"]["excluded_nodes"] == 2  # the Gemm and the Mul feeding it


def test_node_names_map_back_to_module_paths():
    assert module_path("/layer2/short/short.0/Conv") == "layer2.short.0"
    assert module_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_path("/spiky/Mul") == "spiky" and module_path("/GlobalAveragePool") == ""
    from autotiacc.engines.onnxruntime import _export_bytes

    w = load_workload(OUTLIER)
    graph = _export_bytes(w.build_model(), w.example_inputs())
    ops = {n.name: n.op_type for n in onnx.load_from_string(graph).graph.node}
    assert [ops[n] for n in nodes_under(graph, ["spiky.lin"])] == ["Gemm"]
    assert sorted(ops[n] for n in nodes_under(graph, ["spiky.lin"], feeders=True)) == ["Gemm", "Mul"]
    assert sorted(ops[n] for n in nodes_under(graph, ["smooth"])) == ["Gemm", "Gemm", "Relu"]


@pytest.mark.parametrize("values,ctx,why", [
    ({"precision": {"mode": "int8_static"}}, CPU, "backend eager runs PyTorch's kernels"),
    ({"precision": {"mode": "int8_static"}, "execution": {"backend": "torchscript"}}, CPU, "backend torchscript"),
    ({"precision": {"mode": "int8_static"}, "execution": {"backend": "compile"}}, CPU, "backend compile"),
    (_static(), SearchContext(device="cuda", level=1, onnxruntime=True), "for the CPU"),
    (_static(), SearchContext(device="cpu", level=1, onnxruntime=False),
     "backend onnxruntime is not installed" if OPENVINO_QUANTIZES else "pip install 'autotiacc\\[onnx\\]'"),
])
def test_int8_static_is_refused_where_it_cannot_be_built(values, ctx, why):
    reason = get_knob("precision").incompatible(configs_from_params(values), ctx)
    assert reason is not None and re.search(why, reason), reason


def test_int8_static_is_offered_from_level_1_where_onnxruntime_is():
    knob = get_knob("precision")
    space = {"mode": ["fp32", "int8_static"]}
    assert "int8_static" in knob.choices("mode", space, CPU)
    assert knob.choices("mode", space, SearchContext(**{**CPU.__dict__, "level": 0})) == ["fp32"]
    # without onnxruntime, OpenVINO's NNCF is the quantizer left, where it is installed
    assert knob.choices("mode", space, SearchContext(**{**CPU.__dict__, "onnxruntime": False})) == (
        ["fp32", "int8_static"] if OPENVINO_QUANTIZES else ["fp32"])
    assert get_knob("precision").incompatible(configs_from_params(_static()), CPU) is None


def test_the_latency_strategy_seeds_int8_static_early_at_level_1():
    from autotiacc.engine.space import seeds
    from autotiacc.knobs import all_knobs
    from autotiacc.strategy import load_strategy

    strategy = load_strategy("inference-latency")
    modes = [s.get("mode") for s in seeds(strategy, all_knobs(), CPU)]
    assert "int8_static" in modes[:4]
    assert "int8_static" not in [s.get("mode") for s in seeds(strategy, all_knobs(),
                                                               SearchContext(**{**CPU.__dict__, "level": 0}))]


def test_groups_under_int8_static_name_the_layers_kept_in_fp32():
    cfg = PrecisionConfig(mode="int8_static", groups=[["spiky.lin", "fp32"]])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="kept in fp32"):
        PrecisionConfig(mode="int8_static", groups=(("spiky.lin", "bf16_weights"),))


def test_plan_apply_and_the_artifact_run_the_scales_that_were_measured(tmp_path):
    """The final's build records the calibrated ranges; a plan carrying them quantizes with
    them in `plan.apply` (no calibration data at hand) and bakes them into its ONNX artifact."""
    import autotiacc
    from autotiacc.inference.one_shape import OneShape
    from autotiacc.inference.artifacts import export_for_plan

    w = load_workload(OUTLIER)
    values = _static(groups=[("spiky.lin", "fp32")])
    runner, info = OneShape().build(w, values, device="cpu", tolerance=0.05)  # as the final builds it
    record = info["engine_records"]["int8_static"]
    assert record["ranges"] and record["calibrated_on"] == "4 batches"
    Plan(knobs=configs_from_params(values), extra={"int8_static": record}).save(tmp_path / "plan.json")
    plan = load_plan(tmp_path)
    x = w.example_inputs()
    measured = runner()  # the final's candidate on the example inputs
    fast = plan.apply(w.build_model(), x)
    assert fast.notes["int8_static"]["record"]["calibrated_on"] == "recorded ranges"
    assert torch.equal(fast(*x), measured)
    entry = export_for_plan(tmp_path, w)
    # the artifact holds the model under its wrapper's scope: the ranges and kept layers follow it
    assert entry["int8_static"] == {**{k: v for k, v in record.items() if k != "ranges"},
                                    "calibrated_on": "recorded ranges"}
    graph = onnx.load(str(tmp_path / entry["file"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    assert torch.allclose(autotiacc.load_artifact(tmp_path)(*x), measured, atol=1e-5)
    data = json.loads((tmp_path / "plan.json").read_text())
    data["extra"]["int8_static"]["ranges"] = {"t": ["not a number", 1.0, "float32"]}
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="int8_static.ranges"):
        load_plan(tmp_path).apply(w.build_model(), x)


def test_the_report_shows_each_groups_int8_static_error_and_what_the_plan_kept():
    from types import SimpleNamespace

    from autotiacc.report.profile import profile_sections

    ok = {"ok": True, "finite": True, "rel_l2": 0.009, "quick_speedup": None, "reason": ""}
    bad = {"ok": False, "finite": True, "rel_l2": 0.49, "quick_speedup": None, "reason": "exceeds tolerance 0.05"}
    prof = {"method": "profiler_attribution", "forward": {}, "modules": [],
            "sensitivity": [{"path": "smooth.0", "type": "Linear", "inclusive_share": 0.4, "score": 0.0,
                             "sensitivity": {"int8_static": ok}},
                            {"path": "spiky.lin", "type": "Linear", "inclusive_share": 0.2, "score": 0.0,
                             "sensitivity": {"int8_static": bad}}]}
    plan = {"knobs": [config_to_dict(PrecisionConfig(mode="int8_static", groups=(("spiky.lin", "fp32"),)))]}
    sections = dict(profile_sections(SimpleNamespace(profile=prof, plan=plan, trials=None)))
    rows = [line for line in sections["Per-layer precision"] if line.startswith("| ")]
    assert rows[0].split("|")[4].strip() == "int8_static"
    assert rows[1].startswith("| smooth.0 ") and "0.009" in rows[1] and rows[1].rstrip(" |").endswith("int8_static")
    assert rows[2].startswith("| spiky.lin ") and "excluded (0.49)" in rows[2] and rows[2].rstrip(" |").endswith("fp32")


def test_an_encoders_artifact_replays_the_scales_the_final_recorded(tmp_path):
    """The artifact's graph holds the model under its wrapper's scope, parameters included
    (`model.encoder.layers.0.norm1.bias`): every recorded range is found there under its new name."""
    import autotiacc
    from autotiacc.inference.one_shape import OneShape
    from autotiacc.inference.artifacts import export_for_plan

    w = load_workload(MODELS.parent.parent / "examples" / "transformer.py")
    values = _static()
    runner, info = OneShape().build(w, values, device="cpu", tolerance=0.5)
    Plan(knobs=configs_from_params(values), extra=info["engine_records"]).save(tmp_path / "plan.json")
    assert export_for_plan(tmp_path, w)["int8_static"]["calibrated_on"] == "recorded ranges"
    assert torch.equal(autotiacc.load_artifact(tmp_path)(*w.example_inputs()), runner())


@pytest.mark.parametrize("flags,reduce_range", [("avx avx2 fma", True), ("avx2 avx512f avx512_vnni", False),
                                                ("avx2 avx_vnni", False), ("avx2 amx_int8", False)])
def test_weights_use_7_bits_only_on_a_cpu_without_vnni(monkeypatch, flags, reduce_range):
    """u8 x s8 products summed in pairs saturate int16 without VNNI (vpmaddubsw): reduce_range there."""
    monkeypatch.setenv("AUTOTIACC_CPU_FLAGS", flags)
    assert QuantSettings.for_this_cpu() == QuantSettings(reduce_range=reduce_range)
