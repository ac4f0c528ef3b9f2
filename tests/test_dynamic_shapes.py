"""Dynamic input shapes: traffic parsing, bucket edges, the bucketed dispatcher (padding,
un-padding, out-of-range fallback, bounded graphs, per-bucket backend and precision), the
traffic evaluation, plan schema 2 round trip and version-1 plans, verify over the mix."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

from autotiacc.inference.shapes.bucketed import BucketedModel
from autotiacc.inference.shapes.buckets import (BucketSpec, OutOfRangeWarning, ShapePlan, infer_axes, own_label,
                               quantile_edges, spec_from_values)
from autotiacc.errors import PlanError, UserInputError
from autotiacc.inference.evaluate import evaluate
from autotiacc.knobs import SearchContext, configs_from_params, get_knob
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.shapes.shape_tuning import StaticShapes, shape_tuning_for, values_from_plan
from autotiacc.inference.shapes.traffic import histogram, load_traffic_file, parse_traffic
from autotiacc.inference.shapes.traffic_eval import evaluate_traffic, mixture_quantile
from autotiacc.inference.workload import load_workload

from .conftest import ROOT, run_cli

AXES = {"batch_size": [(0, 0), (1, 0)], "seq_len": [(0, 1), (1, 1)]}


@pytest.fixture
def tiny(models_dir):
    return load_workload(models_dir / "tiny_encoder_traffic.py")


def _ref(model, x):
    with torch.inference_mode():
        return model(*x)


# -- traffic -------------------------------------------------------------------------------------
def test_parse_traffic_merges_duplicates_and_normalises_weights():
    shapes = parse_traffic([{"batch_size": 1, "seq_len": 9, "weight": 3}, {"batch_size": "2", "seq_len": 50},
                            {"batch_size": 1, "seq_len": 9, "weight": 1}])
    assert [(s.batch_size, s.dim_dict["seq_len"]) for s in shapes] == [(1, 9), (2, 50)]
    assert [round(s.weight, 6) for s in shapes] == [0.8, 0.2]
    assert histogram(shapes, "seq_len") == pytest.approx({9: 0.8, 50: 0.2})


@pytest.mark.parametrize("rows, needle", [
    ([{"seq_len": 9, "weight": 1}], "`batch_size`"),
    ([{"batch_size": 1, "seq_len": 9, "weight": -1}], "`weight` got -1"),
    ([{"batch_size": 0, "seq_len": 9}], "`batch_size` got 0"),
    ([{"batch_size": 1, "seq_len": 9.5}], "`seq_len` got 9.5"),
    ([{"batch_size": 1, "seq_len": 9}, {"batch_size": 1, "width": 4}], "same dynamic dims"),
    ([], "empty"),
    (["1,9"], "mapping"),
])
def test_parse_traffic_rejects_bad_rows_with_the_fix(rows, needle):
    with pytest.raises(UserInputError, match=None) as err:
        parse_traffic(rows, origin="t")
    assert needle in str(err.value)


def test_traffic_file_csv_and_json_agree(tmp_path):
    (tmp_path / "t.csv").write_text("batch_size,seq_len,weight\n1,9,0.6\n4,250,0.4\n")
    (tmp_path / "t.json").write_text(json.dumps([{"batch_size": 1, "seq_len": 9, "weight": 0.6},
                                                 {"batch_size": 4, "seq_len": 250, "weight": 0.4}]))
    assert load_traffic_file(tmp_path / "t.csv") == load_traffic_file(tmp_path / "t.json")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(UserInputError, match="`--traffic`.*csv or .json"):
        load_traffic_file(tmp_path / "t.txt")
    with pytest.raises(UserInputError, match="no such file"):
        load_traffic_file(tmp_path / "missing.csv")


def test_mixture_quantile_weights_shapes():
    samples = {"a": [1.0] * 10, "b": [100.0] * 10}
    assert mixture_quantile(samples, {"a": 0.995, "b": 0.005}, 0.99) == 1.0
    assert mixture_quantile(samples, {"a": 0.9, "b": 0.1}, 0.99) == 100.0


# -- buckets -------------------------------------------------------------------------------------
def test_quantile_edges_cover_the_traffic_and_align():
    hist = {9: 0.4, 16: 0.3, 37: 0.2, 250: 0.1}
    assert quantile_edges(hist, 1) == [250]
    edges = quantile_edges(hist, 3, align=8)
    assert edges[-1] == 250 and edges == sorted(set(edges)) and len(edges) <= 3
    assert all(e % 8 == 0 for e in edges[:-1])
    assert quantile_edges({1: 0.5, 2: 0.3, 4: 0.2}, 6) == [1, 2, 4]


def test_infer_axes_finds_batch_and_named_dims(tiny):
    assert infer_axes(tiny, ["batch_size", "seq_len"], {"batch_size": 2, "seq_len": 5}) == AXES
    with pytest.raises(UserInputError, match="`width`"):
        infer_axes(tiny, ["batch_size", "width"], {"batch_size": 2, "width": 3})


def test_bucket_spec_picks_smallest_holding_bucket_and_round_trips():
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 64]}, axes=AXES)
    buckets = spec.buckets()
    assert buckets[spec.index({"batch_size": 3, "seq_len": 53})] == {"batch_size": 4, "seq_len": 64}
    assert buckets[spec.index({"batch_size": 1, "seq_len": 16})] == {"batch_size": 2, "seq_len": 16}
    assert spec.index({"batch_size": 5, "seq_len": 10}) is None
    again = BucketSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()
    with pytest.raises(UserInputError, match="increasing"):
        BucketSpec(edges={"seq_len": [64, 16]}, axes=AXES)
    with pytest.raises(PlanError, match="edges"):
        BucketSpec.from_dict({"padded": []})


def test_bucketed_model_pads_unpads_and_falls_back_once(tiny):
    model = tiny.build_model()
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 48]}, axes=AXES)
    fast = BucketedModel(model, configs_from_params({}), spec, pad_inputs=tiny.user_hook("pad_inputs"))
    for b, s in ((1, 5), (3, 33), (2, 16), (4, 48)):  # unseen in-range shapes, incl. odd batch and length
        x = tiny.example_inputs(b, seed=b, seq_len=s)
        out = fast(*x)
        assert out.shape == (b, 3)
        torch.testing.assert_close(out, _ref(model, x), rtol=1e-4, atol=1e-5)
    assert 0 < fast.padding_waste() < 1
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            x = tiny.example_inputs(5, seq_len=20)
            torch.testing.assert_close(fast(*x), _ref(model, x))
    assert [r.category for r in rec] == [OutOfRangeWarning]
    assert "outside every tuned bucket" in str(rec[0].message) and fast.calls_out_of_range == 3


def test_bucketed_model_needs_pad_inputs_for_padded_dims(tiny):
    spec = BucketSpec(edges={"batch_size": [4], "seq_len": [48]}, axes=AXES)
    with pytest.raises(PlanError, match="pad_inputs"):
        BucketedModel(tiny.build_model(), configs_from_params({}), spec)
    batch_only = BucketSpec(edges={"batch_size": [4]}, axes={"batch_size": AXES["batch_size"]})
    fast = BucketedModel(tiny.build_model(), configs_from_params({}), batch_only)  # batch padding is built in
    x = tiny.example_inputs(3, seq_len=7)
    torch.testing.assert_close(fast(*x), _ref(fast.original, x), rtol=1e-4, atol=1e-5)


def test_a_bucketed_model_raises_dynamo_limits_only_inside_its_own_calls(tiny):
    """Building and serving a compiled BucketedModel leaves the caller's process with its own
    recompile limit (issue 20: it used to be raised for good in __init__); inside its calls it
    has room for every bucket, and a call that raises restores it too."""
    cfg = torch._dynamo.config
    before = cfg.recompile_limit
    model = tiny.build_model()
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 48]}, axes=AXES)
    fast = BucketedModel(model, configs_from_params({"execution": {"backend": "compile"}}), spec,
                         pad_inputs=tiny.user_hook("pad_inputs"))
    assert cfg.recompile_limit == before  # nothing changed by building it
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(cfg.recompile_limit))
    with pytest.warns(OutOfRangeWarning):  # out of every bucket: the eager model runs inside the call
        fast(*tiny.example_inputs(8, seq_len=16))
    assert seen and seen[0] >= len(spec.buckets()) + 8 > before and cfg.recompile_limit == before
    hook.remove()
    model.register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fast(*tiny.example_inputs(8, seq_len=16))
    assert cfg.recompile_limit == before


@pytest.mark.slow
def test_compiled_buckets_bound_the_graphs(tiny):
    """Serving many shapes compiles one graph per padded bucket and never recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny.build_model()
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 48]}, axes=AXES)
    fast = BucketedModel(model, configs_from_params({"execution": {"backend": "compile"}}), spec,
                         pad_inputs=tiny.user_hook("pad_inputs"))
    counters.clear()
    fast.prepare(lambda b, **d: tiny.example_inputs(b, **d))
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= len(spec.buckets())
    for b in (1, 2, 3, 4):
        for s in (3, 9, 16, 17, 29, 48):
            x = tiny.example_inputs(b, seed=s, seq_len=s)
            torch.testing.assert_close(fast(*x), _ref(model, x), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for 24 unseen shapes
    assert sum(counters["recompiles"].values()) == 0 if "recompiles" in counters else True


# -- the tuner's side ----------------------------------------------------------------------------
def test_shape_tuning_samples_buckets_and_records_them(tiny, tmp_path):
    import optuna

    st = shape_tuning_for(tiny)
    assert st.names == ["batch_size", "seq_len"] and st.axes == AXES
    study = optuna.create_study()
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = st.suggest(trial, {"execution": {"backend": "compile"}})
        spec = BucketSpec(edges=values["shapes"]["edges"], axes=AXES, padded=values["shapes"]["padded"])
        assert len(spec.buckets()) <= st.max_buckets
        assert spec.edges["seq_len"][-1] == 40 and spec.edges["batch_size"][-1] == 3  # covers all traffic
        seen.add(values["shapes"]["label"])
        study.tell(trial, 1.0)
    assert len(seen) > 1
    eager = st.suggest(study.ask(), {"execution": {"backend": "eager"}})["shapes"]
    assert eager["padded"] == [False] and eager["edges"] == {"batch_size": [3], "seq_len": [40]}
    with pytest.raises(UserInputError, match="`--p99-ms`"):
        shape_tuning_for(tiny, p99_ms=-1)


def test_no_traffic_means_static_tuning(models_dir):
    """One shape: the same hooks, which leave the knobs alone and time them with `evaluate`."""
    w = load_workload(models_dir / "tiny_mlp.py")
    st = shape_tuning_for(w)
    assert isinstance(st, StaticShapes)
    values = {"execution": {"backend": "torchscript"}}
    assert st.suggest(None, values) is values and st.label(values) == ""
    assert st.evaluator(measure_s=1.5, prune_above=2.0) == (evaluate, {"target_s": 1.5, "prune_above": 2.0})
    assert st.evaluator(final=True)[1] == {"target_s": 6.0}
    plan = Plan(knobs=configs_from_params({}))
    st.record(plan, values)
    assert plan.shapes is None and values_from_plan(plan) == {k: vars(c) for k, c in plan.knobs.items()}
    with pytest.raises(UserInputError, match="`--p99-ms` needs a traffic mix"):
        shape_tuning_for(w, p99_ms=10)


def test_evaluate_traffic_weights_latency_and_checks_every_shape(tiny):
    st = shape_tuning_for(tiny)
    _, kw = st.evaluator(final=True)
    kw["rounds"] = 5
    shapes = {"edges": {"batch_size": [3], "seq_len": [16, 40]}, "padded": [True, True], "label": "2 buckets"}
    res = evaluate_traffic(tiny, {"padded": {"shapes": shapes}}, **kw)
    cand = res["candidates"]["padded"]
    assert cand["status"] == "ok", cand.get("reason")
    assert len(cand["timing"]["samples_ms"]) == 5 and len(res["baseline"]["samples_ms"]) == 5
    assert cand["ratio"] == pytest.approx(cand["timing"]["median_ms"] / res["baseline"]["median_ms"])
    assert set(cand["per_shape"]) == {s.key() for s in st.traffic}
    assert 0 < cand["padding_waste"] < 1 and cand["p99_mix_ms"] > 0
    assert sum(b["traffic_share"] for b in cand["buckets"]) == pytest.approx(1.0)
    assert cand["accuracy"]["rel_l2"] < 1e-4  # padded vs unpadded, traffic + unseen shapes
    kw["p99_ms"] = 1e-6
    res = evaluate_traffic(tiny, {"padded": {"shapes": shapes}}, **kw)
    assert res["candidates"]["padded"]["status"] == "rejected"
    assert "--p99-ms" in res["candidates"]["padded"]["reason"]


def test_evaluate_traffic_rejects_padding_that_changes_outputs(tiny, monkeypatch):
    """Without a mask-aware pad, padded results differ: the accuracy guard must catch it."""
    st = shape_tuning_for(tiny)
    _, kw = st.evaluator(final=False)
    kw["rounds"] = 3
    user = tiny._user
    monkeypatch.setattr(user, "pad_inputs", lambda inputs, seq_len: (
        torch.nn.functional.pad(inputs[0], (0, seq_len - inputs[0].shape[1]), value=0),
        torch.nn.functional.pad(inputs[1], (0, seq_len - inputs[1].shape[1]), value=False)))
    shapes = {"edges": {"batch_size": [3], "seq_len": [40]}, "padded": [True], "label": "1 bucket"}
    res = evaluate_traffic(tiny, {"bad_pad": {"shapes": shapes}}, **kw)
    assert res["candidates"]["bad_pad"]["status"] == "rejected"
    assert "shape b" in res["candidates"]["bad_pad"]["reason"]


def test_plan_with_buckets_round_trips_and_applies(tiny, tmp_path):
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 48]}, axes=AXES, padded=[True, False, True, True])
    plan = Plan(knobs=configs_from_params({}), workload={"file": str(tiny.path)}, shapes=ShapePlan(spec))
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert _json(again.to_dict()) == _json(plan.to_dict())
    model = tiny.build_model()
    with pytest.raises(PlanError, match="pad_inputs=my_model.pad_inputs"):  # a plan never imports model.py
        again.apply(model)
    fast = again.apply(model, pad_inputs=tiny.user_hook("pad_inputs"))
    assert isinstance(fast, BucketedModel) and fast.pad_inputs is not None
    x = tiny.example_inputs(3, seq_len=29)
    torch.testing.assert_close(fast(*x), _ref(model, x), rtol=1e-4, atol=1e-5)


def test_cli_rejects_bad_traffic_in_one_line(tmp_path, models_dir):
    bad = tmp_path / "t.csv"
    bad.write_text("batch_size,seq_len,weight\n1,9,abc\n")
    res = run_cli("tune", str(models_dir / "tiny_encoder_traffic.py"), "--traffic", str(bad), "--budget", "30s",
                  "--out", str(tmp_path / "run"), "--quiet", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "row 0: `weight` got 'abc'" in res.stderr.strip().splitlines()[-1]
    res = run_cli("tune", str(models_dir / "tiny_mlp.py"), "--p99-ms", "5", "--budget", "30s",
                  "--out", str(tmp_path / "run2"), "--quiet", timeout=120)
    assert res.returncode == 2 and "`--p99-ms` needs a traffic mix" in res.stderr


SERVE_SCRIPT = """
import sys, warnings, torch
sys.path.insert(0, {models!r})
import tiny_encoder_traffic as m
import autotiacc
model = m.build_model().eval()
fast = autotiacc.load_plan({plan!r}).apply(model, pad_inputs=m.pad_inputs)
for b, s in ((1, 6), (3, 23), (4, 40), (2, 7), (3, 40)):
    x = m.example_inputs(b, s)
    with torch.inference_mode():
        ref = model(*x)
    torch.testing.assert_close(fast(*x), ref, rtol=2e-2, atol=2e-2)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    x = m.example_inputs(6, 50)
    assert fast(*x).shape == (6, 3)
print("served", type(fast).__name__, len(rec))
"""


def _serve_in_fresh_process(models_dir, plan_path) -> str:
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT.format(models=str(models_dir), plan=str(plan_path))],
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_saved_bucketed_plan_serves_in_a_fresh_process(tiny, models_dir, tmp_path):
    """No tuning in the serving process: the plan file alone rebuilds the dispatcher."""
    spec = BucketSpec(edges={"batch_size": [2, 4], "seq_len": [16, 40]}, axes=AXES, padded=[True, True, False, True])
    plan = Plan(knobs=configs_from_params({"execution": {"backend": "torchscript"}}), workload={"file": str(tiny.path)},
                shapes=ShapePlan(spec))
    plan.save(tmp_path / "plan.json")
    assert _serve_in_fresh_process(models_dir, tmp_path / "plan.json").split()[-3:] == ["served", "BucketedModel", "1"]


@pytest.mark.slow
def test_tune_with_traffic_end_to_end(tmp_path, models_dir):
    traffic = tmp_path / "traffic.csv"
    traffic.write_text("batch_size,seq_len,weight\n1,6,5\n2,12,3\n3,24,2\n4,40,1\n")
    out = tmp_path / "run"
    # the short strategy's patience ends the tune, not the budget: beside two CPU-bound processes
    # a 45 s quick tune measured only the baseline (its trial alone took 17 s)
    res = run_cli("tune", str(models_dir / "tiny_encoder_traffic.py"), "--traffic", str(traffic), "--budget", "5m",
                  "--strategy", str(models_dir / "short_strategy.yaml"), "--out", str(out), "--quiet", timeout=600)
    assert res.returncode == 0, res.stderr
    plan = json.loads((out / "plan.json").read_text())
    trials = __import__("pandas").read_csv(out / "trials.csv")
    measured = trials[trials["status"] == "ok"]
    assert len(measured) >= 2 and measured["p99_mix_ms"].notna().all() and measured["param_seq_len_buckets"].notna().any()
    assert measured["baseline"].sum() == 1  # flagged, not recognised by its label
    assert plan["schema_version"] == 2 and "shapes" not in plan["extra"]
    if "final" in plan["extra"]:  # re-measured: each variant in its own processes, windows of rounds of the mix
        assert plan["extra"]["final_alternating"]["method"] == "alternating processes"
        assert "traffic mix" in plan["extra"]["final_alternating"]["window"]
    if plan["fell_back"]:  # the tiny model may gain nothing: then the plan is eager, and says why
        assert plan["shapes"] is None and plan["note"]
    else:
        shapes = plan["shapes"]
        assert (out / "traffic.png").exists()
        assert shapes["edges"]["seq_len"][-1] == 40 and shapes["edges"]["batch_size"][-1] == 4
        assert "Dynamic shapes: buckets" in (out / "report.md").read_text()
    assert "served" in _serve_in_fresh_process(models_dir, out / "plan.json")


def test_throughput_strategy_searches_the_serving_batch(tiny):
    import optuna

    from autotiacc.strategy import load_strategy

    strategy = load_strategy("inference-throughput")
    st = shape_tuning_for(tiny, strategy=strategy, p99_ms=1e4)
    assert st.serve_batches == [1, 2, 4, 8, 16, 32]
    study = optuna.create_study()
    for _ in range(6):
        trial = study.ask()
        shapes = st.suggest(trial, {"execution": {"backend": "torchscript"}})["shapes"]
        assert shapes["edges"]["batch_size"] == [shapes["serve_batch"]] == [trial.params["serve_batch"]]
        study.tell(trial, 1.0)
    _, kw = st.evaluator(final=False)
    kw["rounds"] = 4
    shapes = {"edges": {"batch_size": [4], "seq_len": [40]}, "padded": [True], "serve_batch": 4, "label": "b4"}
    res = evaluate_traffic(tiny, {"b4": {"shapes": shapes}}, **kw)
    cand = res["candidates"]["b4"]
    assert res["per_sample"] and cand["status"] == "ok", cand.get("reason")
    assert cand["samples_per_s"] == pytest.approx(1e3 / cand["timing"]["median_ms"])
    assert cand["p99_mix_ms"] >= max(v["median_ms"] for v in cand["per_shape"].values()) / 4


def test_throughput_without_traffic_tunes_the_batch_only(models_dir):
    from autotiacc.strategy import load_strategy

    w = load_workload(models_dir / "tiny_mlp.py")
    st = shape_tuning_for(w, strategy=load_strategy("inference-throughput"))
    assert st.names == ["batch_size"] and st.axes == {"batch_size": [(0, 0)]}


def test_without_pad_inputs_only_the_shared_runner_is_searched(tmp_path):
    import optuna

    f = tmp_path / "nopad.py"
    f.write_text("import torch\n"
                 "def build_model():\n    return torch.nn.Linear(4, 2)\n"
                 "def example_inputs(batch_size=1, seq_len=3):\n    return (torch.randn(batch_size, seq_len, 4),)\n"
                 "def traffic():\n    return [{'batch_size': 1, 'seq_len': 3}, {'batch_size': 2, 'seq_len': 7}]\n")
    st = shape_tuning_for(load_workload(f))
    assert not st.can_pad
    study = optuna.create_study()
    for _ in range(5):
        trial = study.ask()
        assert st.suggest(trial, {"execution": {"backend": "compile"}})["shapes"]["padded"] == [False]
        study.tell(trial, 1.0)


def test_report_shows_buckets_traffic_and_latency_vs_shape(tiny, tmp_path):
    from autotiacc.report import write_report

    st = shape_tuning_for(tiny)
    _, kw = st.evaluator(final=True)
    kw["rounds"] = 3
    values = {"shapes": {"edges": {"batch_size": [3], "seq_len": [16, 40]}, "padded": [True, False],
                         "label": "2 buckets"}}
    res = evaluate_traffic(tiny, {"c": values}, **kw)["candidates"]["c"]
    plan = Plan(knobs=configs_from_params({}))
    st.record(plan, values, res)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "run.json").write_text(json.dumps({"workload": {"name": "tiny"}, "sessions": []}))
    written = write_report(tmp_path)
    assert {"traffic.png", "traffic_batch.png", "latency_vs_shape.png"} <= set(written)
    md = (tmp_path / "report.md").read_text()
    assert "## Dynamic shapes: buckets" in md
    assert "| b3xseq_len16 | specialised, padded |" in md and "| b3xseq_len40 | shared, exact shape |" in md


def test_resumed_study_must_tune_the_same_traffic(tiny, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    shape_tuning_for(tiny).suggest(study.ask(), {})
    other = shape_tuning_for(tiny, traffic_file=_write(tmp_path / "t.csv", "batch_size,seq_len\n1,5\n2,9\n"))
    with pytest.raises(UserInputError, match="another traffic mix"):
        other.suggest(optuna.load_study(study_name="s", storage=storage).ask(), {})
    again = shape_tuning_for(tiny)
    assert "shapes" in again.suggest(optuna.load_study(study_name="s", storage=storage).ask(), {})


def _json(d):
    return json.loads(json.dumps(d))


def _write(path, text):
    path.write_text(text)
    return path


# -- per-bucket configs, plan schema 2, version-1 plans, verify over the mix ----------------------
PER_BUCKET = {"edges": {"batch_size": [3], "seq_len": [16, 40]}, "padded": [False, True],
              "knobs": [{"execution": {"backend": "torchscript"}}, {"precision": {"mode": "bf16_weights"}}]}


def _ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_per_bucket_backend_and_precision_are_searched(tiny):
    """With a search context, Optuna picks a backend and precision for the buckets of large
    requests; an ONNX Runtime bucket is always padded (fixed shapes), an eager one never; while
    stage-1 seeds are queued, every bucket runs the trial's own knobs."""
    import math

    import optuna

    from autotiacc.strategy import load_strategy

    st = shape_tuning_for(tiny, strategy=load_strategy("inference-latency"))
    ctx = SearchContext(level=1, onnxruntime=True)
    engines = {"onnxruntime"} | ({"openvino"} if get_knob("openvino").applies(ctx) else set())
    assert set(st.bucket_choices(ctx)) == {"eager", "torchscript", "compile", *engines}
    assert "bf16_autocast" not in st.bucket_choices(ctx)["onnxruntime"]  # incompatible, as the knob says
    if "openvino" in engines:  # the openvino knob's refusals count too: torch's precision modes do not carry
        assert "bf16_autocast" not in st.bucket_choices(ctx)["openvino"]
    assert st.bucket_choices(ctx)["eager"] == ["fp32", "bf16_autocast", "fp16_autocast", "bf16_weights", "fp16_weights"]
    assert st.bucket_choices(SearchContext(level=0)) != {}  # backends still differ at level 0
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    knobs = {"execution": {"backend": "torchscript"}, "precision": {"mode": "fp32"}}
    study.enqueue_trial({"seq_len_buckets": 3})
    study.enqueue_trial({"seq_len_buckets": 3})
    seed = study.ask()
    assert not any(st.suggest(seed, knobs, ctx)["shapes"]["knobs"]) and "bucket_knobs" not in seed.params
    study.tell(seed, 1.0)
    own_backends, own_modes, splits = set(), set(), 0
    for _ in range(30):
        trial = study.ask()
        values = st.suggest(trial, knobs, ctx)
        study.tell(trial, 1.0)
        sh = values["shapes"]
        spec = spec_from_values(sh, st.axes)
        assert len(sh["knobs"]) == len(sh["padded"]) == len(spec.buckets())
        sizes = [math.prod(b.values()) for b in spec.buckets()]
        own = [i for i, k in enumerate(sh["knobs"]) if k]
        assert all(sizes[i] > sizes[j] for i in own for j in range(len(sizes)) if j not in own)  # the large ones
        splits += bool(own)
        for idx, k in enumerate(sh["knobs"]):
            backend = spec.configs(idx, configs_from_params(values))["execution"].backend
            own_backends.add(k.get("execution", {}).get("backend"))
            own_modes.add(k.get("precision", {}).get("mode"))
            assert sh["padded"][idx] if backend == "onnxruntime" else True
            assert not sh["padded"][idx] if backend == "eager" else True
    assert splits >= 5 and {"onnxruntime", "eager"} <= own_backends and "bf16_weights" in own_modes


def test_per_bucket_configs_are_evaluated_and_recorded_in_the_plan(tiny, tmp_path):
    st = shape_tuning_for(tiny)
    _, kw = st.evaluator(final=True)
    kw["rounds"] = 3
    values = {"shapes": {**PER_BUCKET, "label": "2 buckets"}}
    res = evaluate_traffic(tiny, {"mixed": values}, **kw)["candidates"]["mixed"]
    assert res["status"] == "ok", res.get("reason")
    assert [b["knobs"] for b in res["buckets"]] == ["backend=torchscript", "mode=bf16_weights"]
    assert own_label({"execution": configs_from_params({})["execution"]}) == "backend=eager"
    assert 1e-4 < res["accuracy"]["rel_l2"] < 5e-2  # bf16 on the long bucket: not bit-exact, within tolerance
    plan = Plan(knobs=configs_from_params({}))
    st.record(plan, values, res)
    assert [{n: c.__class__.__name__ for n, c in k.items()} for k in plan.shapes.spec.knobs] == [
        {"execution": "ExecutionConfig"}, {"precision": "PrecisionConfig"}]
    assert plan.shapes.measured["per_shape"] == res["per_shape"]
    assert values_from_plan(plan)["shapes"]["knobs"][1]["precision"]["mode"] == "bf16_weights"


def test_plan_schema_2_carries_buckets_and_their_configs(tiny, tmp_path):
    spec = spec_from_values(PER_BUCKET, AXES)
    plan = Plan(knobs=configs_from_params({}), shapes=ShapePlan(spec, traffic=[{"batch_size": 1, "seq_len": 5,
                                                                                "weight": 1.0}], label="mixed"))
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 2 and "shapes" not in raw["extra"]
    assert [b["edge"] for b in raw["shapes"]["buckets"]] == [{"batch_size": 3, "seq_len": 16},
                                                            {"batch_size": 3, "seq_len": 40}]
    assert raw["shapes"]["buckets"][1]["knobs"] == [{"_type": "PrecisionConfig", "_version": 1,
                                                     "_data": {"mode": "bf16_weights", "groups": []}}]
    again = load_plan(path)
    assert again.shapes.spec.knobs == spec.knobs and _json(again.to_dict()) == raw
    model = tiny.build_model()
    fast = again.apply(model, pad_inputs=tiny.user_hook("pad_inputs"))
    for b, s in ((1, 5), (3, 40), (2, 33)):
        x = tiny.example_inputs(b, seed=s, seq_len=s)
        torch.testing.assert_close(fast(*x), _ref(model, x), rtol=5e-2, atol=5e-2)
    # a hostile or hand-edited plan: knob types resolve only from the registry; fixed shapes stay padded
    raw["shapes"]["buckets"][0]["knobs"] = [{"_type": "os.system", "_version": 1, "_data": {}}]
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="unknown _type 'os.system'"):
        load_plan(path)
    raw["shapes"]["buckets"][0]["knobs"] = [{"_type": "ExecutionConfig", "_version": 1,
                                             "_data": {"backend": "onnxruntime"}}]
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="onnxruntime.*must be padded"):
        load_plan(path).apply(model, pad_inputs=tiny.user_hook("pad_inputs"))
    raw["shapes"]["buckets"][0]["edge"] = {"batch_size": 9, "seq_len": 16}
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="`edge` of each bucket"):
        load_plan(path)


def test_version_1_plans_still_load_and_apply(tiny, tmp_path):
    """Version 1 kept the buckets and their figures in `extra.shapes`; without it, a static plan."""
    v1 = {"schema": "autotiacc.plan", "schema_version": 1, "device": "cpu", "fingerprint": {}, "workload": {},
          "knobs": [{"_type": "ExecutionConfig", "_version": 1, "_data": {"backend": "torchscript"}}],
          "speedup": 1.2, "fell_back": False, "extra": {"strategy": "inference-latency", "shapes": {
              "edges": {"batch_size": [2, 4], "seq_len": [16, 40]}, "padded": [True, True, False, True],
              "axes": {"batch_size": [[0, 0], [1, 0]], "seq_len": [[0, 1], [1, 1]]}, "label": "4 buckets",
              "traffic": [{"batch_size": 1, "seq_len": 5, "weight": 1.0}], "p99_budget_ms": None,
              "serve_batch": None, "p99_mix_ms": 1.5, "padding_waste": 0.1, "per_shape": {"b1xseq_len5": {}}}}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    plan = load_plan(tmp_path / "v1.json")
    assert plan.extra == {"strategy": "inference-latency"} and plan.shapes.label == "4 buckets"
    assert plan.shapes.spec.padded == [True, True, False, True] and plan.shapes.spec.knobs == [{}] * 4
    assert plan.shapes.measured == {"p99_mix_ms": 1.5, "padding_waste": 0.1, "per_shape": {"b1xseq_len5": {}}}
    model = tiny.build_model()
    fast = plan.apply(model, pad_inputs=tiny.user_hook("pad_inputs"))
    x = tiny.example_inputs(3, seq_len=23)
    torch.testing.assert_close(fast(*x), _ref(model, x), rtol=1e-4, atol=1e-4)
    assert plan.to_dict()["schema_version"] == 2 and plan.to_dict()["shapes"]["measured"]["p99_mix_ms"] == 1.5
    del v1["extra"]["shapes"]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    static = load_plan(tmp_path / "v1.json")
    assert static.shapes is None and not isinstance(static.apply(model), BucketedModel)


@pytest.mark.skipif(not _ort_available(), reason="onnxruntime is not installed")
def test_a_bucket_runs_a_static_shape_onnxruntime_session(tiny):
    """The encoder's fused fast path has no ONNX export; each padded bucket gets its own
    session, exported at exactly its shape (no dynamic axes), beside a TorchScript bucket."""
    spec = spec_from_values({"edges": {"batch_size": [2, 4], "seq_len": [16, 40]}, "padded": [True, False, True, True],
                             "knobs": [{"execution": {"backend": "onnxruntime"}}, {},
                                       {"execution": {"backend": "onnxruntime"}}, {"precision": {"mode": "bf16_weights"}}]},
                            AXES)
    model = tiny.build_model()
    fast = BucketedModel(model, configs_from_params({"execution": {"backend": "torchscript"}}), spec,
                         pad_inputs=tiny.user_hook("pad_inputs"))
    build = fast.prepare(lambda b, **d: tiny.example_inputs(b, **d))
    assert set(build) == {"b2xseq_len16", "b2xseq_len40", "b4xseq_len16", "b4xseq_len40"}
    for b, s in ((1, 5), (2, 16), (1, 33), (4, 9), (3, 40)):
        x = tiny.example_inputs(b, seed=s, seq_len=s)
        torch.testing.assert_close(fast(*x), _ref(model, x), rtol=3e-2, atol=3e-2)
    sessions = [r for r in fast.runners if hasattr(r._state.runner, "onnx_bytes")]
    assert len(sessions) == 2 and fast.runners[0] is not fast.runners[2]


def test_verify_times_a_traffic_plan_over_its_mix(tiny, tmp_path):
    from autotiacc.engine.fidelity import MIN_ROUNDS
    from autotiacc.hardware import fingerprint
    from autotiacc.inference.verify import verify_plan

    st = shape_tuning_for(tiny)
    values = {"execution": {"backend": "torchscript"}, "shapes": {
        "edges": {"batch_size": [3], "seq_len": [16, 40]}, "padded": [True, False], "knobs": [{}, {}], "label": "2"}}
    plan = Plan(knobs=configs_from_params(values), fingerprint=fingerprint("cpu"), speedup=1.0, tolerance=2e-2,
                workload=tiny.identity())
    st.record(plan, values)
    plan.save(tmp_path / "plan.json")
    res = verify_plan(tmp_path / "plan.json", tiny.path, tolerance=0.9, measure_s=1.0)
    assert res.measured["shapes"] == sorted(s.key() for s in st.traffic), res.problems
    # the tune's final method: the plan and the baseline alone in their own processes, windows in
    # turns, each window whole rounds of the mix (one sample per round), the noise test over windows
    assert res.measured["windows"] >= MIN_ROUNDS and res.measured["n"] >= 20
    assert any("traffic-weighted over 5 shapes" in line and "each alone in its own process" in line
               for line in res.lines), res.lines
