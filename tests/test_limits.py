"""Limits that scale with the model (issue 19 item 6): every limit of the final derives from the
measured build and forward times (`engine.limits`), so a slow model's candidate is timed, not
timed out, and the search keeps what that final needs."""
from __future__ import annotations

import time

import optuna
import pytest

from autotiacc.engine import limits
from autotiacc.engine.loop import END_S
from autotiacc.inference.shapes.shape_tuning import StaticShapes
from autotiacc.inference.workload import load_workload

from .conftest import MODELS

TS = {"execution": {"backend": "torchscript"}}


def test_limits_scale_with_the_measured_model():
    """Every limit of a final step grows with the model's measured build and forward: a model with
    a 2 s forward gets windows, warm-ups and builds far longer than the tiny one's, and a candidate
    never gets a tighter limit than the baseline's own."""
    tiny, slow = limits.Cost(build_s=0.05, forward_s=1e-4), limits.Cost(build_s=5.0, forward_s=2.0)
    assert limits.window_limit(0.3, 2.0, slow) > 5 * 2.0 > limits.window_limit(0.3, 1e-4, tiny)
    assert limits.warmup_limit(2.0, slow) >= 6 * 2.0
    assert limits.build_limit(limits.Cost(build_s=30.0, forward_s=2.0), slow) > 30.0
    # a cheap candidate of an expensive model still gets the baseline's own limit
    assert limits.build_limit(limits.Cost(), slow) >= limits.build_limit(None, slow) > slow.build_s
    # a slow model's final takes its baseline's windows from fewer processes
    assert limits.baseline_processes(5, 0.5, 10.0) == 5 and limits.baseline_processes(5, 10.0, 30.0) == 2
    # a trial is never stopped sooner than the baseline's own trial could end
    assert limits.trial_limit(strategy_limit_s=300, share_s=7.0, baseline_trial_s=40.0) >= 40.0
    assert limits.trial_limit(strategy_limit_s=300, share_s=7.0, baseline_trial_s=None) == 7.0


def _searched(study, number_attrs: dict) -> list:
    """`study`'s trial as the search recorded it: a real Optuna trial with the figures it measured."""
    study.add_trial(optuna.trial.create_trial(value=0.001, user_attrs=number_attrs))
    return study.get_trials(deepcopy=False)[-1:]


@pytest.mark.slow
def test_the_final_does_not_time_out_a_candidate_whose_forward_the_search_measured():
    """A model with a 0.8 s forward and five test batches: each final process takes seconds to build
    and check it. Given the time the search keeps for it (`final_reserve`, from the trial's measured
    figures), the final times the search's winner beside the baseline. (A fixed 10 s limit on each
    build dropped BERT-base's ONNX Runtime candidate: "timeout: no result within 10 s".)"""
    workload = load_workload(MODELS / "slow_forward.py", timeout=120)
    study = optuna.create_study()
    tops = _searched(study, {"knobs": TS, "build_s": 1.7, "latency_ms": 0.05, "baseline_ms": 800.0,
                             "test_batches": 5, "status": "ok"})
    hooks = StaticShapes(final_measure_s=1.0)
    # what the search keeps (engine.loop): the final's reserve, and the end's for the plan and report
    timeout = hooks.final_reserve(tops, process_s=workload.check_s) + END_S
    t0 = time.monotonic()
    out = hooks.final_measure(workload, {f"trial_{tops[0].number}": TS}, device="cpu", tolerance=2e-2, warmup_s=3.0,
                              timeout=timeout, costs=_final_costs(tops, workload.check_s))
    assert out.ok, out.error
    cand = out.value["candidates"][f"trial_{tops[0].number}"]
    assert cand["status"] == "ok", cand.get("reason")
    assert cand["speedup"] > 10  # it was timed: the traced graph runs without the sleep
    assert time.monotonic() - t0 <= timeout + 1.0  # and within the time the search kept for it


def _final_costs(tops, check_s):
    from autotiacc.inference.final_costs import final_costs_of

    return final_costs_of(tops, check_s)


def test_calls_that_compile_are_never_slow_calls():
    """A compiled model meeting new input shapes recompiles: those calls take far longer than the
    pace limit, yet are set aside and counted as compiling, not as two slow calls in a row."""
    import torch

    from autotiacc.measure import Pace

    torch._dynamo.reset()
    model = torch.compile(torch.nn.Linear(4, 4))
    pace = Pace(limit=500.0)  # ms: a compile takes seconds, a call of this Linear microseconds
    with torch.no_grad():
        for rows in (2, 3, 5, 7):  # a compile, a recompile (dynamic from then on), two plain calls
            pace.time(lambda rows=rows: model(torch.randn(rows, 4)), "cpu")
    assert pace.compiling_calls >= 2 and len(pace.values) + pace.compiling_calls == 4
    torch._dynamo.reset()
