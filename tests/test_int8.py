"""int8 weights for nn.Linear as precision modes of the precision knob: `int8_dynamic` (torch.ao,
CPU) and weight-only `int8_weights` (torchao, optional extra). They build on a tiny MLP, stay near
fp32, pass through the real trial's accuracy guard, round-trip through plan JSON, are off at
level 0, and the combinations that cannot work are refused before a trial is spent on them."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autotiacc.inference.candidate import OptimizedModel
from autotiacc.inference.evaluate import evaluate
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import PrecisionConfig, SearchContext, config_from_dict, config_to_dict, configs_from_params, get_knob
from autotiacc.knobs.int8 import has_linear, torchao_available

from .conftest import MODELS

INT8 = ["int8_dynamic", pytest.param("int8_weights", marks=pytest.mark.skipif(
    not torchao_available(), reason="int8_weights needs torchao (extra `quant`)"))]
CPU = SearchContext(device="cpu", level=1, onnxruntime=True, torchao=True, has_linear=True)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", INT8)
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_int8_builds_on_a_tiny_mlp_and_stays_near_fp32(mode, backend):
    model, x = _mlp(), torch.randn(4, 32)
    fast = OptimizedModel(model, configs_from_params({"precision": {"mode": mode}, "execution": {"backend": backend}}),
                          example_inputs=(x,))
    if backend == "eager":  # the Linear layers really are int8 now (the original is untouched)
        lin = fast._state.model[0]
        assert ("int8" in type(lin.weight).__name__.lower() if mode == "int8_weights"
                else "quantized.dynamic" in type(lin).__module__)
        assert model[0].weight.dtype == torch.float32
    out = fast(x)
    assert out.dtype == torch.float32 and 0 < _rel_l2(out, model(x)) < 3e-2  # rounded, and near fp32


@pytest.mark.parametrize("mode", INT8)
def test_int8_candidates_go_through_the_trials_accuracy_guard(mode):
    w = load_workload(MODELS / "tiny_mlp.py")
    res = evaluate(w, {"int8": {"precision": {"mode": mode}}}, device="cpu", tolerance=0.2,
                   target_s=0.05, warmup_s=0.02)
    r = res["candidates"]["int8"]
    assert r["status"] == "ok", r.get("reason")
    assert 0 < r["accuracy"]["rel_l2"] < 0.2
    strict = evaluate(w, {"int8": {"precision": {"mode": mode}}}, device="cpu", tolerance=1e-6,
                      target_s=0.05, warmup_s=0.02)["candidates"]["int8"]
    assert strict["status"] == "rejected" and "tolerance" in strict["reason"]


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_weights"])
def test_int8_modes_round_trip_through_plan_json(mode, tmp_path):
    cfg = PrecisionConfig(mode=mode)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    path = Plan(knobs=configs_from_params({"precision": {"mode": mode}})).save(tmp_path / "plan.json")
    assert load_plan(path).knobs["precision"] == cfg
    assert cfg.dtype_name is None  # not a bf16/fp16 cast
    with pytest.raises(ValueError, match="groups.*needs `mode` fp32 or tf32"):
        PrecisionConfig(mode=mode, groups=(("0", "bf16_weights"),))


def test_int8_modes_are_offered_where_they_can_run_and_off_at_level_0():
    knob = get_knob("precision")
    space = {"mode": ["fp32", "bf16_weights", "int8_dynamic", "int8_weights"]}

    def offered(**kw) -> list:
        return knob.choices("mode", space, SearchContext(**{**CPU.__dict__, **kw}))

    assert offered() == ["fp32", "bf16_weights", "int8_dynamic", "int8_weights"]
    assert offered(level=0) == ["fp32"]
    assert offered(has_linear=False) == ["fp32", "bf16_weights"]  # int8 lowers nn.Linear only
    assert offered(torchao=False) == ["fp32", "bf16_weights", "int8_dynamic"]
    assert offered(device="cuda") == ["fp32", "bf16_weights", "int8_weights"]  # torch.ao int8: CPU kernels


@pytest.mark.parametrize("values,ctx,why", [
    ({"precision": {"mode": "int8_dynamic"}, "execution": {"backend": "onnxruntime"}}, CPU, "quantized::linear_dynamic"),
    ({"precision": {"mode": "int8_weights"}, "execution": {"backend": "onnxruntime"}}, CPU, "back into fp32"),
    ({"precision": {"mode": "int8_dynamic"}}, SearchContext(device="cuda", level=1), "CPU only"),
    ({"precision": {"mode": "int8_weights"}}, SearchContext(level=1, torchao=False), "needs torchao"),
    ({"precision": {"mode": "bf16_weights"}, "execution": {"backend": "onnxruntime"}}, CPU, "no bf16 kernels"),
    ({"precision": {"groups": [["0", "bf16_weights"]]}, "execution": {"backend": "onnxruntime"}}, CPU,
     "no bf16 kernels"),
])
def test_combinations_that_cannot_work_are_refused(values, ctx, why):
    assert why in (get_knob("precision").incompatible(configs_from_params(values), ctx) or "")


def test_allowed_combinations_are_not_refused():
    knob = get_knob("precision")
    for values, ctx in [({"precision": {"mode": "int8_dynamic"}, "execution": {"backend": "torchscript"}}, CPU),
                        ({"precision": {"mode": "int8_weights"}, "execution": {"backend": "compile"}}, CPU),
                        ({"precision": {"mode": "fp16_weights"}, "execution": {"backend": "onnxruntime"}}, CPU),
                        ({"precision": {"mode": "bf16_weights"}, "execution": {"backend": "onnxruntime"}},
                         SearchContext(device="cuda", level=1))]:
        assert knob.incompatible(configs_from_params(values), ctx) is None, values


def test_onnxruntime_with_bf16_weights_fails_on_the_cpu():
    """Why the refusal above exists; if a newer onnxruntime builds it, drop the refusal."""
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 32)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|bfloat16"):
        OptimizedModel(_mlp(), configs_from_params({"precision": {"mode": "bf16_weights"},
                                                    "execution": {"backend": "onnxruntime"}}), example_inputs=(x,))


@pytest.mark.parametrize("mode", INT8)
def test_an_eager_int8_plan_exports_as_torchscript_and_loads(mode, tmp_path):
    import autotiacc
    from autotiacc.inference.artifacts import export_for_plan

    wl = load_workload(MODELS / "tiny_mlp.py")
    Plan(knobs=configs_from_params({"precision": {"mode": mode}})).save(tmp_path / "plan.json")
    assert export_for_plan(tmp_path, wl)["format"] == "torchscript"
    x = wl.example_inputs()
    assert _rel_l2(autotiacc.load_artifact(tmp_path)(*x), wl.build_model()(*x)) < 3e-2


def test_int8_plans_torch_export_cannot_carry_export_as_torchscript():
    from autotiacc.inference.artifacts import artifact_format

    def fmt(mode, backend):
        return artifact_format(configs_from_params({"precision": {"mode": mode}, "execution": {"backend": backend}}))

    assert fmt("int8_dynamic", "compile") == fmt("int8_dynamic", "eager") == fmt("int8_weights", "eager") == "torchscript"
    assert fmt("int8_weights", "compile") == "aoti" and fmt("fp32", "eager") == "export"


def test_model_facts_say_whether_there_is_a_linear_layer():
    assert has_linear(_mlp()) and not has_linear(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert has_linear(torch.jit.trace(_mlp(), torch.randn(1, 32)))  # TorchScript: by original name
    facts = load_workload(MODELS / "tiny_mlp.py").validate()
    assert facts.has_linear


STRATEGY = """name: resume-modes
description: a study whose precision modes change between sessions
objective: latency
measure_s: 0.3
final_measure_s: 0.5
final_top_k: 1
patience: 3
knobs:
  execution: {backend: [eager]}
  precision: {mode: MODES}
enqueue:
  - {}
"""


@pytest.mark.slow
def test_resuming_a_study_over_other_precision_choices_is_one_clear_error(tmp_path):
    """A study from before the int8 modes (or with another strategy file) cannot be continued
    by Optuna over new categorical choices: exit 2 with the fix, not Optuna's traceback."""
    from .conftest import run_cli

    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(STRATEGY.replace("MODES", "[fp32, bf16_weights]"))
    new.write_text(STRATEGY.replace("MODES", "[fp32, bf16_weights, int8_dynamic]"))
    out, model = tmp_path / "run", str(MODELS / "tiny_mlp.py")
    # budgets no machine spends (a 15 s one ended before the baseline on a loaded machine, its
    # set-up alone 9 s): the strategy's patience and its two choices end each session
    first = run_cli("tune", model, "--budget", "3m", "--strategy", str(old), "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    res = run_cli("tune", model, "--budget", "3m", "--strategy", str(new), "--out", str(out), "--resume", "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "other choices than this run offers" in res.stderr and "give another --out" in res.stderr
    again = run_cli("tune", model, "--budget", "3m", "--strategy", str(old), "--out", str(out), "--resume", "--quiet")
    assert again.returncode == 0, again.stderr  # the same setup still resumes
