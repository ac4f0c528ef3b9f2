"""One definition of the eager baseline, and a plan that keeps it changes nothing (issue 18 item 5):
every path times `baseline.EagerBaseline` (no_grad, eval mode), and a baseline plan's `apply`
returns the user's model itself, which is what `verify` then times."""
from __future__ import annotations

import pytest
import torch

import autotiacc
from autotiacc.inference.one_shape import OneShape
from autotiacc.inference.baseline import EagerBaseline
from autotiacc.inference.evaluate import reference_for
from autotiacc.inference.plan import Plan
from autotiacc.inference.shapes.shape_tuning import shape_tuning_for
from autotiacc.inference.verify import verify_plan
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import configs_from_params

from .conftest import MODELS


def _runs_as_a_user_runs_it(runner) -> None:
    """What comes out of an eager call under no_grad: plain tensors (not inference_mode's), no graph."""
    out = runner()
    assert isinstance(runner, EagerBaseline) and not runner.model.training
    assert not torch.is_inference(out) and not out.requires_grad


def test_one_shape_and_traffic_tunes_time_the_same_eager_baseline():
    one = load_workload(MODELS / "tiny_mlp.py", batch_size=4)
    _runs_as_a_user_runs_it(reference_for(one, "cpu").baseline)  # the trials' baseline
    runner, info = OneShape().build(one, None, device="cpu", tolerance=2e-2)  # the final's and verify's
    _runs_as_a_user_runs_it(runner)
    assert info == {}
    mix = load_workload(MODELS / "tiny_encoder_traffic.py")
    bench = shape_tuning_for(mix).bench({})  # a traffic tune's final and verify
    runners, _ = bench.build(mix, None, device="cpu", tolerance=2e-2)
    for run in runners.runners.values():
        _runs_as_a_user_runs_it(run)


def test_a_plan_that_keeps_the_baseline_applies_as_the_model_itself(tmp_path):
    model = load_workload(MODELS / "tiny_mlp.py").build_model()
    kept = Plan(knobs=configs_from_params({}), fell_back=True, speedup=1.0)
    assert kept.keeps_baseline and kept.apply(model) is model and kept.apply(model, device="cpu") is model
    loaded = autotiacc.load_plan(kept.save(tmp_path / "plan.json"))
    assert loaded.apply(model) is model
    changed = Plan(knobs=configs_from_params({"execution": {"backend": "torchscript"}}))
    assert not changed.keeps_baseline and changed.apply(model) is not model


@pytest.mark.slow
def test_verify_of_a_baseline_plan_times_the_model_itself(tmp_path):
    path = Plan(knobs=configs_from_params({}), fell_back=True, speedup=1.0).save(tmp_path / "plan.json")
    res = verify_plan(path, MODELS / "tiny_mlp.py", measure_s=0.5, timeout_s=120)
    assert "the plan keeps the baseline: `apply` returns the model itself, and that is what was timed." in res.lines
    assert res.measured["speedup"] > 0 and res.measured["rel_l2"] is None  # no wrapper was built, nor checked
