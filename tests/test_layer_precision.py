"""Per-layer precision: config round trip, apply, sensitivity, Optuna parameters, whole tune."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from autotiacc.errors import PlanError
from autotiacc.knobs import SearchContext, config_from_dict, config_to_dict, configs_from_params, get_knob
from autotiacc.knobs.precision import PrecisionConfig
from autotiacc.inference.layer_precision import CHECKS, enqueue_params
from autotiacc.knobs.precision_groups import apply_group_precision, param_name
from autotiacc.profiling.search import search_groups
from autotiacc.profiling.sensitivity import analyse_sensitivity
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.workload import load_workload

MODELS = Path(__file__).resolve().parent / "models"
OVERFLOW = MODELS / "fp16_overflow.py"


def _overflow_model():
    return load_workload(OVERFLOW).build_model()


def test_groups_round_trip_through_json_exactly():
    cfg = PrecisionConfig(groups=[["mlp.0", "bf16_weights"], ("norm", "fp32"), ["mlp.2", "int8_dynamic"]])
    assert cfg.groups == (("mlp.0", "bf16_weights"), ("norm", "fp32"), ("mlp.2", "int8_dynamic"))
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg and isinstance(back.groups[0], tuple) and hash(back) == hash(cfg)


@pytest.mark.parametrize("bad, words", [
    ({"groups": [["a", "fp8"]]}, "`groups` entry"),
    ({"groups": [["a"]]}, "`groups` entry"),
    ({"mode": "bf16_autocast", "groups": [["a", "fp16_weights"]]}, "needs `mode` fp32"),
])
def test_bad_groups_are_refused_with_the_fix(bad, words):
    with pytest.raises(PlanError, match=words):
        config_from_dict({"_type": "PrecisionConfig", "_version": 1, "_data": bad})


def test_regions_keep_the_model_dtype_and_plan_apply_reproduces_them(tmp_path):
    model, x = _overflow_model(), torch.randn(8, 64)
    groups = (("mlp.0", "bf16_weights"), ("mlp.2", "fp16_autocast"), ("head", "int8_dynamic"), ("norm", "fp32"))
    direct = apply_group_precision(_overflow_model(), groups)
    assert direct.mlp[0].inner.weight.dtype == torch.bfloat16
    assert type(direct.norm) is torch.nn.LayerNorm  # fp32 groups are left alone
    with torch.no_grad():
        want, ref = direct(x), model(x)
    assert want.dtype == torch.float32 and torch.isfinite(want).all()
    assert (want - ref).norm() / ref.norm() < 2e-2
    assert not torch.equal(want, ref)  # something was lowered
    plan = Plan(knobs=configs_from_params({"precision": {"groups": groups}}))
    plan.save(tmp_path / "plan.json")
    fast = load_plan(tmp_path / "plan.json").apply(model, (x,))
    assert torch.equal(fast(x), want)


def test_apply_names_a_path_that_is_not_a_submodule():
    with pytest.raises(ValueError, match="'nope.x' is not a submodule"):
        apply_group_precision(_overflow_model(), [("nope.x", "bf16_weights")])
    with pytest.raises(ValueError, match="lowers nn.Linear only"):
        apply_group_precision(_overflow_model(), [("norm", "int8_dynamic")])


def test_sensitivity_excludes_the_overflowing_layer_and_ranks_the_rest():
    w = load_workload(OVERFLOW)
    groups = [{"path": p, "type": t, "inclusive_share": s, "flops": 0, "linear": t == "Linear"}
              for p, t, s in [("big", "Linear", 0.3), ("norm", "LayerNorm", 0.1), ("mlp.0", "Linear", 0.2)]]
    sens = analyse_sensitivity(w, groups, checks=CHECKS, modes=["fp16_autocast", "fp16_weights", "bf16_weights", "int8_dynamic"],
                               tolerance=2e-2)
    by = {g["path"]: g for g in sens}
    for mode in ("fp16_autocast", "fp16_weights"):
        assert not by["big"]["sensitivity"][mode]["ok"] and "overflow" in by["big"]["sensitivity"][mode]["reason"]
    assert "fp16_weights" not in by["norm"]["allowed"]  # its input is cast to fp16 and overflows
    assert "bf16_weights" in by["big"]["allowed"]  # bf16 has float32's exponent range
    assert {"fp16_weights", "int8_dynamic"} <= set(by["mlp.0"]["allowed"])
    assert "int8_dynamic" not in by["norm"]["sensitivity"]  # int8 is offered for Linear only
    assert [g["score"] for g in sens] == sorted((g["score"] for g in sens), reverse=True)
    searched = search_groups(sens)
    assert all(g["choices"][0] == "fp32" for g in searched)
    big = next(g for g in searched if g["path"] == "big")
    assert not any(m.startswith("fp16") for m in big["choices"])
    start = enqueue_params(searched, sens)[0]
    assert start[param_name("big")] == "bf16_weights"


def test_precision_knob_samples_one_parameter_per_group_only_under_fp32():
    knob = get_knob("precision")
    groups = [{"path": "a.b", "choices": ["fp32", "bf16_weights"]}, {"path": "c", "choices": ["fp32", "fp16_autocast"]}]
    ctx = SearchContext(level=1, extras={"precision_groups": groups})
    study = optuna.create_study()
    study.enqueue_trial({"mode": "fp32", "prec[a.b]": "bf16_weights", "prec[c]": "fp32"})
    study.enqueue_trial({"mode": "bf16_autocast"})
    space = {"mode": ["fp32", "bf16_autocast"]}
    t = study.ask()
    cfg = knob.suggest(t, space, ctx)
    assert cfg.groups == (("a.b", "bf16_weights"), ("c", "fp32"))
    assert set(t.params) == {"mode", "prec[a.b]", "prec[c]"}
    study.tell(t, 1.0)
    t = study.ask()
    cfg = knob.suggest(t, space, ctx)
    assert cfg == PrecisionConfig(mode="bf16_autocast") and set(t.params) == {"mode"}
    study.tell(t, 1.0)
    # all-fp32 groups are the baseline, not a new candidate
    study.enqueue_trial({"mode": "fp32", "prec[a.b]": "fp32", "prec[c]": "fp32"})
    t = study.ask()
    assert knob.suggest(t, space, ctx) == PrecisionConfig()


@pytest.mark.slow
def test_tune_keeps_the_overflowing_layer_wide_and_output_finite(tmp_path):
    """Done-means on this CPU: fp16 is the only lowered type offered; the tune must finish,
    never put `big` (or the whole model) in fp16, and its plan must give finite outputs."""
    from autotiacc.inference.task import TuneOptions, tune
    from autotiacc.report import write_report

    w = load_workload(OVERFLOW)
    opts = TuneOptions(budget_s=60, out_dir=tmp_path / "run", strategy=str(MODELS / "fp16_layer_strategy.yaml"))
    result = tune(w, opts)
    prof = json.loads((tmp_path / "run" / "profile.json").read_text())
    big = next(g for g in prof["sensitivity"] if g["path"] == "big")
    assert big["allowed"] == [] and all(not s["finite"] for s in big["sensitivity"].values())
    assert "big" not in {g["path"] for g in prof["search_groups"]}
    precision = result.plan.knobs["precision"]
    assert precision.mode == "fp32"
    assert dict(precision.groups).get("big", "fp32") == "fp32"
    trials = result.run_dir / "trials.csv"
    import pandas as pd

    t = pd.read_csv(trials)
    assert (t["label"].astype(str).str.contains("groups=")).any()  # per-layer candidates were measured
    whole_fp16 = t[t["label"] == "mode=fp16_autocast"]
    assert not whole_fp16.empty and set(whole_fp16["status"]) <= {"rejected", "duplicate"}
    assert result.plan.extra["layer_precision"]
    model, x = w.build_model(), w.example_inputs()
    fast = load_plan(result.run_dir / "plan.json").apply(model, x)
    with torch.no_grad():
        out, ref = fast(*x), model(*x)
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() <= opts.effective_tolerance
    written = write_report(result.run_dir)
    md = written["md"].read_text()
    assert "## Per-layer precision" in md and "overflow" in md
    assert "top_modules.png" in written and "pareto.png" in written


@pytest.mark.slow
def test_prepare_search_writes_profile_json_and_reuses_it_on_resume(tmp_path):
    from autotiacc.inference.layer_precision import prepare_search
    from autotiacc.profiling.schema import save_profile
    from autotiacc.strategy import load_strategy

    w = load_workload(OVERFLOW)
    strategy = load_strategy(str(MODELS / "fp16_layer_strategy.yaml"))
    extras = prepare_search(w, tmp_path, device="cpu", level=1, strategy=strategy, tolerance=0.02, timeout=120)
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert extras["precision_groups"] == prof["search_groups"] and prof["search_groups"]
    assert "big" not in {g["path"] for g in prof["search_groups"]}
    assert set(extras["precision_fp32"]) == {param_name(g["path"]) for g in prof["search_groups"]}
    assert all(m == "fp32" for m in extras["precision_fp32"].values())
    # --resume keeps the saved groups (their Optuna choices must not change) instead of re-profiling
    prof["search_groups"] = prof["search_groups"][:1]
    save_profile(prof, tmp_path / "profile.json")
    again = prepare_search(w, tmp_path, device="cpu", level=1, strategy=strategy, tolerance=0.02, timeout=120,
                           resume=True)
    assert again["precision_groups"] == prof["search_groups"]
    (tmp_path / "l0").mkdir()
    none = prepare_search(w, tmp_path / "l0", device="cpu", level=0, strategy=strategy, tolerance=0.02, timeout=120)
    assert none["precision_groups"] == [] and none["precision_enqueue"] == []
    prof0 = json.loads((tmp_path / "l0" / "profile.json").read_text())
    assert prof0["modules"] and any("level 0" in u for u in prof0["unavailable"])


def test_sensitivity_stops_at_its_time_limit_and_says_so():
    w = load_workload(OVERFLOW)
    groups = [{"path": "mlp.0", "type": "Linear", "inclusive_share": 0.1, "flops": 0, "linear": True},
              {"path": "big", "type": "Linear", "inclusive_share": 0.1, "flops": 0, "linear": True}]
    sens = analyse_sensitivity(w, groups, checks=CHECKS, modes=["bf16_weights"], tolerance=2e-2, time_limit_s=0.0)
    assert all(g["allowed"] == [] and "ran out" in g["skipped"] for g in sens)
    assert search_groups(sens) == []
