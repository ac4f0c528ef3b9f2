"""Traffic (dynamic-shape) and throughput tuning on a device other than the CPU, proven on
`meta`: the model, every traffic shape's inputs, the bucket builds' inputs and the serving
batches all go to the trial's device through the real evaluator (`ShapeTuning.evaluator`)."""
from __future__ import annotations

from autotiacc.inference.shapes.shape_tuning import ShapeTuning, shape_tuning_for
from autotiacc.inference.workload import load_workload

from .conftest import MODELS


def test_traffic_trial_puts_model_and_every_input_on_the_target_device():
    w = load_workload(MODELS / "placement_traffic.py")
    calls = w._user.CALLS
    calls.clear()
    st = shape_tuning_for(w)
    assert isinstance(st, ShapeTuning)
    fn, kw = st.evaluator(final=True)  # the final re-measurement's arguments: unseen shapes checked too
    kw.update(rounds=2, warmup_s=0.01)
    four = {"edges": {"batch_size": [1, 3], "seq_len": [3, 9]}, "padded": [True] * 4, "knobs": [{}] * 4}
    candidates = {
        "padded": {"shapes": four},  # every request padded to its bucket (batch and seq_len)
        "shared": {"runtime": {"inference_mode": False}},  # one runner serves every shape as it comes
        "serve4": {"shapes": {"edges": {"batch_size": [4], "seq_len": [9]}, "padded": [True], "serve_batch": 4}},
    }
    res = fn(w, candidates, device="meta", **kw)
    for name, r in res["candidates"].items():
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback"))
        assert "accuracy not checked" in r["note"] and r["per_shape"]
    assert calls and {dev for _, dev, _ in calls} == {"meta"}
    assert len({i for i, _, _ in calls}) >= 4  # the baseline and each candidate's own copy
    shapes = {s for _, _, s in calls}
    assert (3, 9, 4) in shapes and (4, 9, 4) in shapes  # padded bucket builds, full serving batches
    assert res["per_sample"] and res["candidates"]["serve4"]["samples_per_s"] > 0


def test_throughput_strategy_is_not_refused_off_the_cpu():
    """`--strategy inference-throughput` without traffic used to be refused on any device but the CPU."""
    from autotiacc.strategy import load_strategy

    w = load_workload(MODELS / "tiny_mlp.py")
    st = shape_tuning_for(w, strategy=load_strategy("inference-throughput"))
    fn, kw = st.evaluator()
    kw.update(rounds=2, warmup_s=0.01)
    res = fn(w, {"b2": {"shapes": {"edges": {"batch_size": [2]}, "padded": [True], "serve_batch": 2}}},
             device="meta", **kw)
    assert res["candidates"]["b2"]["status"] == "ok", res["candidates"]["b2"].get("reason")


def test_cuda_graph_buckets_are_always_padded():
    """A CUDA graph is captured per input shape: padded to its bucket, each bucket replays one
    graph (a shared runner would capture one per request shape, up to its limit, then run without)."""
    import optuna

    st = shape_tuning_for(load_workload(MODELS / "placement_traffic.py"))
    study = optuna.create_study()
    for values in ({"execution": {"backend": "eager", "cuda_graphs": True}},
                   {"execution": {"backend": "torchscript", "cuda_graphs": True}}):
        for _ in range(4):
            trial = study.ask()
            padded = st.suggest(trial, values)["shapes"]["padded"]
            assert padded and all(padded), (values, padded)
            study.tell(trial, 1.0)
    trial = study.ask()  # eager without graphs: nothing to specialise, one shared runner
    assert st.suggest(trial, {"execution": {"backend": "eager"}})["shapes"]["padded"] == [False]


def test_a_warm_worker_builds_the_traffic_reference_once():
    """Trial after trial in one worker: the eager model, the traffic inputs and their outputs
    are built once per workload, mix and device (they were rebuilt on every trial)."""
    w = load_workload(MODELS / "placement_traffic.py")
    calls = w._user.CALLS
    st = shape_tuning_for(w)
    fn, kw = st.evaluator()
    kw.update(rounds=2, warmup_s=0.01)
    calls.clear()
    first = fn(w, {"a": {}}, device="cpu", **kw)
    baseline_ids = {i for i, _, _ in calls}
    calls.clear()
    second = fn(w, {"b": {"runtime": {"inference_mode": False}}}, device="cpu", **kw)
    assert first["candidates"]["a"]["status"] == second["candidates"]["b"]["status"] == "ok"
    ids = [i for i, _, _ in calls]
    assert len(set(ids) & baseline_ids) == 1  # the second trial timed the first trial's baseline model
    n_shapes = len(first["candidates"]["a"]["per_shape"])
    reused = next(iter(set(ids) & baseline_ids))
    # the reused baseline was only timed (warm-up + rounds per shape), never asked for reference outputs again
    assert ids.count(reused) >= n_shapes * 2
    other = load_workload(MODELS / "placement_traffic.py")  # another workload: its own reference
    calls.clear()
    fn(other, {"c": {}}, device="cpu", **kw)
    assert not ({i for i, _, _ in calls} & baseline_ids)
