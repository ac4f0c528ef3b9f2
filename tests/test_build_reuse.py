"""Reuse across candidates (`engines.cache`): a worker exports a model's ONNX graph once for every
ORT candidate of the same graph (session options, int8_static's calibration and quantization
over that export), traces TorchScript once for variants that differ only in run settings, and
the final's fresh processes share exports through the run's cache folder, so a finalist and its
spinning twin export once. Never from `plan.apply`: a user's model may have changed since."""
from __future__ import annotations

from autotiacc.engine.fidelity import evaluate_alternating, time_window
from autotiacc.engine.workers import run_isolated
from autotiacc.engines.cache import BUILD_CACHE_ENV, BUILDS, shared_builds
from autotiacc.inference.evaluate import evaluate
from autotiacc.inference.plan import Plan
from autotiacc.inference.twins import TWIN, merge_twins, with_twins
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import configs_from_params
from autotiacc.strategy import load_strategy

from .conftest import MODELS

ORT = {"execution": {"backend": "onnxruntime"}}
PARALLEL = {**ORT, "ort": {"execution_mode": "parallel", "inter_threads": 1}}
STATIC = {**ORT, "precision": {"mode": "int8_static"}}
STATIC_1T = {**STATIC, "runtime": {"threads": 1}}
TS = {"execution": {"backend": "torchscript"}}
TS_1T = {**TS, "runtime": {"threads": 1}}


def test_a_worker_reuses_exports_calibration_and_traces_across_candidates():
    w = load_workload(MODELS / "tiny_mlp.py")
    hits = BUILDS.hits
    res = evaluate(w, {"ort": ORT, "parallel": PARALLEL, "static": STATIC, "static_1t": STATIC_1T, "ts": TS,
                       "ts_1t": TS_1T}, device="cpu", tolerance=0.2, target_s=0.05, warmup_s=0.02)["candidates"]
    assert all(r["status"] == "ok" for r in res.values()), {n: r.get("reason") for n, r in res.items()}
    reused = {n: r["trial_attrs"]["reused_s"] for n, r in res.items()}
    assert reused["ort"] == 0 and reused["ts"] == 0  # the first of each graph builds it
    # the same export; then the calibration on the same test data; then the same quantized graph
    assert reused["parallel"] > 0 and reused["static"] > 0 and reused["static_1t"] > reused["static"] - 1e-9
    assert reused["ts_1t"] > 0
    # parallel: the export; static: the export; static_1t: the export, the ranges and the int8
    # graph; ts_1t: the trace
    assert BUILDS.hits - hits == 6


def test_plan_apply_never_reuses_a_build():
    w = load_workload(MODELS / "tiny_mlp.py")
    model, x = w.build_model(), w.example_inputs()
    hits = BUILDS.hits
    for _ in range(2):
        Plan(knobs=configs_from_params(ORT)).apply(model, x)
    assert BUILDS.hits == hits


def test_the_finals_processes_share_exports_on_disk_and_the_twin_spins(tmp_path):
    """Two fresh processes, as the final builds a finalist and its twin: the second reads the
    first's export from the run's cache folder, and its session really spins."""
    w = load_workload(MODELS / "tiny_mlp.py")
    cands = with_twins({"trial_1": {**ORT, "ort": {}}}, load_strategy("inference-latency").space("ort"))
    built = {}
    with shared_builds(tmp_path) as env:  # as the tune's final does, for its run directory
        assert env == {BUILD_CACHE_ENV: str(tmp_path / "cache" / "builds")}
        for name, values in cands.items():
            out = run_isolated(time_window, w, name, values, device="cpu", window_s=0, warmup_s=0.01, tolerance=0.1,
                               build_only=True, timeout=120, env=env)
            assert out.ok, out.reason()
            built[name] = out.value
        assert any((tmp_path / "cache" / "builds").iterdir())
    assert not (tmp_path / "cache").exists()  # exported graphs are not left in the run directory
    assert built["trial_1"]["reused_s"] == 0 and built["trial_1" + TWIN]["reused_s"] > 0
    assert built["trial_1"]["ort_session"]["spinning"] is False
    assert built["trial_1" + TWIN]["ort_session"]["spinning"] is True


def test_the_final_measures_the_twin_alone_and_merges_it_with_its_finalist():
    w = load_workload(MODELS / "tiny_mlp.py")
    cands = with_twins({"trial_1": ORT}, load_strategy("inference-latency").space("ort"))
    out = evaluate_alternating(w, cands, target_s=0.2, window_s=0.05, warmup_s=0.1, timeout=240)
    assert out.ok, out.reason()
    results = out.value["candidates"]
    assert results["trial_1" + TWIN]["status"] == "ok" and results["trial_1"]["status"] == "ok"
    assert results["trial_1" + TWIN]["ort_session"]["spinning"] is True
    merged = merge_twins(results, out.value["alternating"]["windows_ms"])
    assert list(merged) == ["trial_1"]
    twin = merged["trial_1"]["twin"]["spinning"]
    assert merged["trial_1"]["variant"] == ("trial_1" + TWIN if twin["kept"] else "trial_1")
    assert merged["trial_1"]["knobs"].get("ort", {}).get("spinning", False) is twin["kept"]
