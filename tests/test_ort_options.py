"""ONNX Runtime's own session options as the `ort` knob: sampled only beside backend onnxruntime,
recorded in the plan (JSON, allow-listed, older plans keep their defaults), and every session
built from a plan has exactly the options that were measured: the trial's, `plan.apply`'s and
the exported artifact's, read back from the live sessions. Spinning is judged only in the
final, each variant alone in its own process (`inference.twins`)."""
from __future__ import annotations

import json

import optuna
import pytest

from autotiacc.engines.onnxruntime import session_summary
from autotiacc.errors import PlanError
from autotiacc.inference.evaluate import evaluate
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.twins import TWIN, merge_twins, twin_trials, with_twins
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import OrtConfig, SearchContext, all_knobs, config_from_dict, config_to_dict, configs_from_params
from autotiacc.strategy import load_strategy

from .conftest import MODELS

OPTIONS = {"execution_mode": "parallel", "inter_threads": 2, "graph_optimization": "extended",
           "memory_pattern": False, "cpu_arena": False}
CTX = SearchContext(device="cpu", level=2, cores=2, onnxruntime=True)


def _ort_values(**ort) -> dict:
    return {"execution": {"backend": "onnxruntime"}, "runtime": {"threads": 1}, "ort": ort}


def _summary(ort: dict, threads: int = 1) -> dict:
    """What a session built with `ort` options and `threads` intra-op threads reports."""
    cfg = OrtConfig(**ort)
    return {"intra_threads": threads, "inter_threads": cfg.inter_threads, "graph_optimization": cfg.graph_optimization,
            "execution_mode": cfg.execution_mode, "memory_pattern": cfg.memory_pattern, "cpu_arena": cfg.cpu_arena,
            "spinning": cfg.spinning, "providers": ["CPUExecutionProvider"]}


def test_ort_config_round_trips_and_older_plans_keep_the_measured_defaults(tmp_path):
    cfg = OrtConfig(**OPTIONS, spinning=True)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    # a plan written before the knob: no OrtConfig entry; it opens sessions as they were measured then
    path = Plan(knobs=configs_from_params(_ort_values())).save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["knobs"] = [k for k in data["knobs"] if k["_type"] != "OrtConfig"]
    path.write_text(json.dumps(data))
    old = load_plan(path).knobs["ort"]
    assert old == OrtConfig() and not old.spinning and old.graph_optimization == "all"
    for bad, words in (({"graph_optimization": "fast"}, "graph_optimization"), ({"inter_threads": -1}, "inter_threads"),
                       ({"spinning": "yes"}, "spinning")):
        data["knobs"].append({"_type": "OrtConfig", "_version": 1, "_data": bad})
        path.write_text(json.dumps(data))
        with pytest.raises(PlanError, match=words):
            load_plan(path)
        data["knobs"].pop()


def test_a_strategy_with_a_bad_ort_choice_is_one_clear_error():
    from autotiacc.errors import StrategyError
    from autotiacc.strategy import strategy_from_dict

    with pytest.raises(StrategyError, match="`ort.graph_optimization` choice 'fast'.*use one of all"):
        strategy_from_dict({"name": "x", "knobs": {"ort": {"graph_optimization": ["all", "fast"]}}}, "x.yaml")
    with pytest.raises(StrategyError, match="did you mean `execution_mode`"):
        strategy_from_dict({"name": "x", "knobs": {"ort": {"execution_mod": ["parallel"]}}}, "x.yaml")


def test_ort_options_are_sampled_only_beside_backend_onnxruntime_and_spinning_never():
    from autotiacc.engine.space import sample

    strategy = load_strategy("inference-latency")
    knobs = [k for k in all_knobs() if k.applies(CTX) or k.name in ("execution", "precision", "runtime")]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for backend in ("eager", "onnxruntime"):
        study.enqueue_trial({"backend": backend})
        trial = study.ask()
        configs = sample(trial, knobs, strategy, CTX)
        ort_params = sorted(p for p in trial.params if p.startswith("ort_"))
        if backend == "eager":
            assert ort_params == [] and configs["ort"] == OrtConfig()
        else:
            assert {"ort_execution_mode", "ort_graph_optimization", "ort_memory_pattern", "ort_cpu_arena"} <= set(ort_params)
            assert "ort_spinning" not in ort_params and configs["ort"].spinning is False
        study.tell(trial, 1.0)


def test_the_trials_session_has_the_sampled_options(tmp_path):
    """The trial runner (evaluate, in the worker's code path) opens its session with the knob's
    options and the runtime knob's threads, and reports what the live session has."""
    w = load_workload(MODELS / "tiny_mlp.py")
    res = evaluate(w, {"ort": _ort_values(**OPTIONS), "default": _ort_values()}, device="cpu", tolerance=0.05,
                   target_s=0.05, warmup_s=0.02)["candidates"]
    assert res["ort"]["status"] == "ok", res["ort"].get("reason")
    assert res["ort"]["trial_attrs"]["ort_session"] == _summary(OPTIONS)
    # the defaults are what every session had before the knob: spinning off, all optimizations
    assert res["default"]["trial_attrs"]["ort_session"] == _summary({})


def test_plan_apply_and_the_artifact_open_the_session_that_was_measured(tmp_path):
    """A plan made from a trial's knobs (as `make_plan` does) rebuilds, in `plan.apply` and in its
    exported artifact's `load_artifact`, a session with the options the trial measured."""
    import autotiacc
    from autotiacc.inference.artifacts import export_for_plan

    w = load_workload(MODELS / "tiny_mlp.py")
    values = _ort_values(**OPTIONS, spinning=True)
    trial = evaluate(w, {"t": values}, device="cpu", tolerance=0.05, target_s=0.05, warmup_s=0.02)["candidates"]["t"]
    measured = trial["trial_attrs"]["ort_session"]
    assert measured == _summary({**OPTIONS, "spinning": True})
    Plan(knobs=configs_from_params(trial["knobs"])).save(tmp_path / "plan.json")
    plan = load_plan(tmp_path)
    fast = plan.apply(w.build_model(), w.example_inputs())
    assert session_summary(fast._state.runner.session) == measured
    entry = export_for_plan(tmp_path, w)
    assert entry["engine_options"] == config_to_dict(plan.knobs["ort"])
    served = autotiacc.load_artifact(tmp_path)
    assert session_summary(served.session) == measured
    x = w.example_inputs()
    assert (served(*x) - fast(*x)).abs().max() < 1e-4


def test_verify_times_the_plan_with_its_session_options(tmp_path):
    from autotiacc.inference.verify import verify_plan

    values = _ort_values(**OPTIONS)
    Plan(knobs=configs_from_params(values)).save(tmp_path / "plan.json")
    result = verify_plan(tmp_path / "plan.json", MODELS / "tiny_mlp.py", measure_s=0.3, timeout_s=300)
    assert result.measured["ort_session"] == _summary(OPTIONS)


def test_the_final_adds_a_spinning_twin_and_keeps_it_only_when_faster_beyond_noise():
    space = load_strategy("inference-latency").space("ort")
    cands = {"trial_3": _ort_values(**OPTIONS), "trial_5": {"execution": {"backend": "torchscript"}}}
    out = with_twins(cands, space)
    assert list(out) == ["trial_3", "trial_3" + TWIN, "trial_5"]
    assert out["trial_3" + TWIN]["ort"]["spinning"] is True and out["trial_3"]["ort"].get("spinning") is None
    assert with_twins(cands, {"spinning": [False]}) == cands  # the strategy can rule spinning out

    class Top:  # a finished trial as the final's time estimate sees it
        number, user_attrs = 3, {"knobs": cands["trial_3"], "build_s": 1.0}

    assert [t.user_attrs["knobs"]["ort"]["spinning"] for t in twin_trials([Top()], space)] == [True]
    ok = {"status": "ok", "ratio": 0.5}
    slow, fast = [10.0, 10.2, 10.1, 10.3, 9.9, 10.0], [8.0, 8.1, 7.9, 8.2, 8.0, 8.1]
    results = {"trial_3": {**ok, "knobs": cands["trial_3"]}, "trial_3" + TWIN: {**ok, "knobs": out["trial_3" + TWIN]}}
    kept = merge_twins(results, {"trial_3": slow, "trial_3" + TWIN: fast})["trial_3"]
    assert kept["variant"] == "trial_3" + TWIN and kept["knobs"]["ort"]["spinning"] and kept["twin"]["spinning"]["kept"]
    same = merge_twins(results, {"trial_3": slow, "trial_3" + TWIN: slow})["trial_3"]
    assert same["variant"] == "trial_3" and not same["twin"]["spinning"]["kept"]
    failed = merge_twins({**results, "trial_3" + TWIN: {"status": "failed", "reason": "x"}}, {"trial_3": slow})
    assert failed["trial_3"]["variant"] == "trial_3" and failed["trial_3"]["twin"]["spinning"]["status"] == "failed"
