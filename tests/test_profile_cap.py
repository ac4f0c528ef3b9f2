"""The profile and sensitivity pass within its share of the budget (issue #12, point 4): a
profile cut at its cap keeps what it finished, cached as partial; later runs complete it; the
search runs on a partial profile. No speed thresholds: the cut is forced by a deadline already
past, or by a model that sleeps while lowered (tests/models/slow_lowered.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest

from autotiacc.inference.layer_precision import CHECKS, prepare_search
from autotiacc.profiling.search import profile_for_search, settle
from autotiacc.profiling.sensitivity import finish_sensitivity
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import SearchContext, get_knob
from autotiacc.strategy import load_strategy

MODELS = Path(__file__).resolve().parent / "models"
SLOW = MODELS / "slow_lowered.py"
STRATEGY = MODELS / "bf16_layer_strategy.yaml"
GROUPS = {"0", "2"}  # the two Linear layers of slow_lowered.py


def test_a_profile_past_its_deadline_keeps_what_it_did_and_a_later_call_completes_it(monkeypatch):
    monkeypatch.delenv("AUTOTIACC_TEST_SLOW_LOWERED_S", raising=False)
    w = load_workload(SLOW)
    cut = profile_for_search(w, checks=CHECKS, modes=["bf16_weights"], tolerance=0.05, deadline=time.time())
    assert cut["modules"] and {g["path"] for g in cut["groups"]} == GROUPS  # the profile itself is kept
    assert cut["partial"].startswith("sensitivity: 2 of 2 groups") and cut["search_groups"] == []
    assert all(g["skipped"].startswith("not analysed (checks of bf16_weights left)") for g in cut["sensitivity"])
    done = profile_for_search(w, checks=CHECKS, modes=["bf16_weights"], tolerance=0.05, start=cut)
    assert "partial" not in done and done["created"] == cut["created"]  # completed, the profile not redone
    assert {g["path"] for g in done["search_groups"]} == GROUPS
    assert all(g["allowed"] == ["bf16_weights"] and not g.get("skipped") for g in done["sensitivity"])
    assert all(g["sensitivity"]["bf16_weights"]["quick_speedup"] > 0 for g in done["sensitivity"])


def test_the_search_uses_the_analysed_groups_of_a_partial_profile(tmp_path):
    w = load_workload(SLOW)
    prof = profile_for_search(w, checks=CHECKS, modes=[], tolerance=0.05)
    ok = {"ok": True, "finite": True, "rel_l2": 1e-3, "reason": ""}
    entries = [dict(prof["groups"][0], sensitivity={"bf16_weights": {**ok, "quick_speedup": 1.2}, "fp16_weights": ok}),
               dict(prof["groups"][1], sensitivity={})]
    modes = ["bf16_weights", "fp16_weights", "int8_dynamic"]
    partial = settle(prof, finish_sensitivity(entries, modes, "cut"))
    assert partial["partial"] and partial["diagnosis"]
    first = next(g for g in partial["sensitivity"] if g["path"] == prof["groups"][0]["path"])
    assert "quick looks at fp16_weights left" in first["skipped"]  # checked, its speed hint left for later
    (tmp_path / "profile.json").write_text(json.dumps(partial))
    extras = prepare_search(w, tmp_path, device="cpu", level=1, strategy=load_strategy(str(STRATEGY)),
                            tolerance=0.05, timeout=0, resume=True)
    analysed = prof["groups"][0]["path"]
    # only the analysed group is offered, with the modes analysed so far; the diagnosis still orders the seeds
    assert extras["precision_groups"] == [{"path": analysed, "choices": ["fp32", "bf16_weights", "fp16_weights"]}]
    assert extras["precision_enqueue"] and extras["diagnosis"] == prof["diagnosis"]
    ctx = SearchContext(level=1, extras=extras)
    study = optuna.create_study()
    for params in extras["precision_enqueue"]:
        study.enqueue_trial({"mode": "fp32", **params})
    t = study.ask()
    cfg = get_knob("precision").suggest(t, {"mode": ["fp32"]}, ctx)
    assert cfg.groups == ((analysed, "bf16_weights"),)
    # a profile cut before any group was analysed: no per-layer groups, the rest of the search as usual
    (tmp_path / "none").mkdir()
    nothing = settle(prof, finish_sensitivity([dict(g, sensitivity={}) for g in prof["groups"]], modes, "cut"))
    (tmp_path / "none" / "profile.json").write_text(json.dumps(nothing))
    extras = prepare_search(w, tmp_path / "none", device="cpu", level=1, strategy=load_strategy(str(STRATEGY)),
                            tolerance=0.05, timeout=0, resume=True)
    assert extras["precision_groups"] == [] and extras["precision_enqueue"] == []


def test_a_mode_far_slower_on_two_test_batches_is_excluded_without_running_the_rest(monkeypatch):
    from autotiacc.profiling.sensitivity import analyse_sensitivity

    monkeypatch.setenv("AUTOTIACC_TEST_SLOW_LOWERED_S", "0.3")  # each lowered layer: 0.3 s per call
    w = load_workload(SLOW)
    layer = type(w.build_model()[0])
    groups = [{"path": p, "type": "SlowWhenLowered", "inclusive_share": 0.5, "flops": 0, "linear": False}
              for p in ("0", "2")]
    before = layer.lowered_calls
    sens = analyse_sensitivity(w, groups, checks=CHECKS, modes=["bf16_weights"], tolerance=0.05)
    for g in sens:
        entry = g["sensitivity"]["bf16_weights"]
        assert not entry["ok"] and entry["finite"] and entry["reason"].startswith("far slower")
        assert g["allowed"] == [] and not g.get("skipped")  # analysed: complete, and not offered
    # of four test batches: two on the first group, one on the next (the mode was far slower already)
    assert len(w.test_data()) == 4 and layer.lowered_calls - before == 3


@pytest.mark.slow
def test_first_profile_keeps_to_its_share_is_cached_partial_and_completed_by_the_next_run(tmp_path, monkeypatch):
    """Through `InferenceTask.prepare`, as a tune runs it, in its worker process: each lowered
    call sleeps 30 s, so the analysis outlasts the 10 % share and the worker is killed at it."""
    from autotiacc.engine.rundir import RunDir
    from autotiacc.inference.task import InferenceTask, TuneOptions

    monkeypatch.setenv("AUTOTIACC_CACHE_DIR", str(tmp_path / "cache"))
    budget = 120.0
    share = 0.1 * budget

    def prepare(name: str) -> tuple[float, dict]:
        task = InferenceTask(load_workload(SLOW), TuneOptions(budget_s=budget, out_dir=tmp_path / name,
                                                              strategy=str(STRATEGY)))
        task.validate(budget)
        run_dir = RunDir(tmp_path / name)
        run_dir.path.mkdir()
        seconds = task.prepare(run_dir, budget)
        return seconds, json.loads((run_dir.path / "profile.json").read_text())

    monkeypatch.setenv("AUTOTIACC_TEST_SLOW_LOWERED_S", "30")
    seconds, first = prepare("first")
    # the share, plus killing the worker and writing the file: the mechanism's slack, not a speed
    assert seconds <= share + 2.0, seconds
    assert first["modules"] and "partial" in first and "stopped: timeout" in first["partial"]
    assert first["search_groups"] == [] and all(g.get("skipped") for g in first["sensitivity"])
    cached = list((tmp_path / "cache" / "profiles").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["partial"]

    monkeypatch.delenv("AUTOTIACC_TEST_SLOW_LOWERED_S")
    seconds, second = prepare("second")  # completes the cached partial profile within its own share
    assert seconds <= share + 2.0, seconds
    assert "partial" not in second and second["created"] == first["created"]
    assert {g["path"] for g in second["search_groups"]} == GROUPS
    assert "partial" not in json.loads(cached[0].read_text())

    seconds, third = prepare("third")  # complete: reused as it is
    assert third == second and seconds < share
