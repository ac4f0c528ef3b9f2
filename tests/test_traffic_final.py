"""The final re-measurement of a traffic tune, and `verify` of a traffic plan: each variant (the
eager baseline, each candidate's bucketed model) alone in processes of its own, windows of
whole rounds of the mix taken in turns (`engine.fidelity` with `traffic_eval.TrafficBench`)."""
import os
import statistics
from dataclasses import replace
from types import SimpleNamespace

import pytest

from autotiacc.engine.fidelity import BASELINE, BASELINE_PROCESSES, FINAL_ROUNDS, AlternatingResult
from autotiacc.engine.loop import choose
from autotiacc.engine.rundir import RunDir
from autotiacc.hardware import fingerprint
from autotiacc.inference.shapes.shape_tuning import ShapeTuning, shape_tuning_for
from autotiacc.inference.task import InferenceTask, TuneOptions
from autotiacc.inference.workload import load_workload

TS_BUCKETS = {"execution": {"backend": "torchscript"}, "shapes": {
    "edges": {"batch_size": [3], "seq_len": [16, 40]}, "padded": [True, False], "knobs": [{}, {}], "label": "2"}}
INVALID = {"precision": {"mode": "int8_nonsense"}, "shapes": TS_BUCKETS["shapes"]}


@pytest.fixture
def tiny(models_dir):
    return load_workload(models_dir / "tiny_encoder_traffic.py")


@pytest.mark.slow
def test_traffic_final_times_each_variant_alone_and_the_plan_records_it(tiny, tmp_path):
    task = InferenceTask(tiny, TuneOptions(budget_s=60, out_dir=tmp_path))
    st = task.shape_tuning
    assert isinstance(st, ShapeTuning)
    st.final_measure_s, st.final_rounds = 0.2, FINAL_ROUNDS  # short windows of one round at least
    task.run_dir, task._fingerprint, task._identity = RunDir(tmp_path), fingerprint("cpu"), tiny.identity()
    tops = [SimpleNamespace(number=3, user_attrs={"knobs": TS_BUCKETS, "label": "ts", "status": "ok"}),
            SimpleNamespace(number=4, user_attrs={"knobs": INVALID, "label": "bad", "status": "ok"})]
    final = task.final(tops, timeout=240)
    assert not isinstance(final, str), final
    alt = task.final_alternating
    assert alt["method"] == "alternating processes" and "5-shape traffic mix" in alt["window"]
    # the baseline's windows come from its own processes in turn, the candidate's from another one
    pids = alt["window_pids"]
    assert len(set(pids[BASELINE])) == BASELINE_PROCESSES and len(set(pids["trial_3"])) == 1
    assert not set(pids["trial_3"]) & set(pids[BASELINE]) and os.getpid() not in pids["trial_3"] + pids[BASELINE]
    windows = alt["windows_ms"]
    assert len(windows["trial_3"]) == len(windows[BASELINE]) >= FINAL_ROUNDS
    status, timing, res = final.candidates[3]
    assert status == "ok" and res["accuracy"]["ok"] and isinstance(res["faster"], bool)
    # the speed-up is over the windows' figures; each window's figure is the median of its rounds of the mix
    assert res["speedup"] == pytest.approx(statistics.median(windows[BASELINE]) / statistics.median(windows["trial_3"]))
    assert timing.n >= len(windows["trial_3"])
    # the per-shape figures the report shows, from the calls of every window
    assert set(res["per_shape"]) == {s.key() for s in st.traffic} and res["p99_mix_ms"] > 0
    assert 0 < res["padding_waste"] < 1 and all(row["latency_ms"] > 0 for row in res["buckets"])
    # an invalid candidate is dropped with its reason; the others go on
    assert final.candidates[4][0] == "failed" and "int8_nonsense" in final.candidates[4][2]["reason"]

    decision = choose(final, tops)
    study = SimpleNamespace(get_trials=lambda deepcopy=False: tops)
    plan = task.make_plan(decision, study)
    assert plan.extra["final_alternating"]["window"] == alt["window"]
    assert plan.extra["final"]["trial_4"]["status"] == "failed"
    if plan.fell_back:  # the tiny model may gain nothing: then the plan keeps the baseline; say it won
        assert decision.kind == "not_faster"
        plan = task.make_plan(replace(decision, kind="winner"), study)
    assert set(plan.shapes.measured["per_shape"]) == set(res["per_shape"])
    # the headline names its noise: what each round (a process of each, back to back) gave
    lo, hi = alt["speedup_range"]["trial_3"]
    assert 0 < lo <= hi and "each alone in its own process" in plan.note
    assert f"{alt['rounds']} rounds, {lo:.2f}x to {hi:.2f}x each" in plan.note


def test_candidate_failing_on_an_unseen_shape_is_dropped_with_the_shape(models_dir, tmp_path):
    """The final's bench checks accuracy on unseen in-range shapes too, in the candidate's process:
    a `pad_inputs` that breaks padded outputs fails only there when the buckets fit the traffic."""
    text = (models_dir / "tiny_encoder_traffic.py").read_text()
    bad = tmp_path / "bad_pad.py"
    bad.write_text(text.replace("pad(mask, (0, extra), value=True)", "pad(mask, (0, extra), value=False)"))
    w = load_workload(bad)
    st = shape_tuning_for(w)
    exact = {"edges": {"batch_size": [1, 2, 3], "seq_len": [5, 12, 30, 40]}, "padded": [True] * 12,
             "knobs": [{}] * 12, "label": "exact"}
    bench = st.bench({"c": {"shapes": exact}})
    assert bench.check_shapes  # unseen shapes between the traffic's sizes
    with pytest.raises(ValueError, match=r"accuracy: .*shape b\d+xseq_len(6|13|31)"):
        bench.build(w, {"shapes": exact}, device="cpu", tolerance=2e-2)


def test_traffic_figures_from_the_windows_reject_a_p99_over_budget(tiny):
    """Parent side, scripted figures: per-shape medians, bucket latencies and p99 over the mix
    come from the calls of all windows; a p99 over `--p99-ms` rejects the candidate."""
    st = shape_tuning_for(tiny, p99_ms=5.0)
    bench = st.bench({"c": TS_BUCKETS})
    keys = [s.key() for s in st.traffic]
    res = AlternatingResult(windows={BASELINE: [2.0] * 5, "c": [1.0] * 5},
                            parts={BASELINE: {k: [2.0, 2.2] for k in keys}, "c": {k: [1.0, 9.0] for k in keys}},
                            info={"c": {"buckets": [{"shape_keys": keys, "traffic_share": 1.0}]}})
    figs = bench.figures(res, "c")
    assert figs["status"] == "rejected" and "exceeds --p99-ms 5" in figs["reason"] and figs["p99_mix_ms"] == 9.0
    assert figs["per_shape"][keys[0]] == {"median_ms": 5.0, "baseline_ms": 2.1, "weight": pytest.approx(4 / 11)}
    assert figs["buckets"][0]["latency_ms"] == pytest.approx(5.0)
    assert bench.summary(res) == {"baseline_p99_mix_ms": 2.2, "per_sample": False}
    st.p99_ms = 10.0
    assert "status" not in st.bench({"c": TS_BUCKETS}).figures(res, "c")
