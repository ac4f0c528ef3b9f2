"""Alternating processes: each variant alone in its own process, windows taken in turns; the
final re-measurement's result format; the noise test is scipy's Mann-Whitney U."""
import statistics

import pytest

from autotiacc.engine import limits
from autotiacc.engine.fidelity import (BASELINE, BASELINE_PROCESSES, AlternatingResult, evaluate_alternating,
                                      measure_alternating)
from autotiacc.inference.workload import load_workload

TS = {"execution": {"backend": "torchscript"}}


@pytest.fixture
def workload(models_dir):
    return load_workload(models_dir / "tiny_mlp.py", batch_size=4)


@pytest.fixture
def slow_eager(models_dir, monkeypatch):
    """Two Linear layers whose eager fp32 calls sleep 10 ms each (the worker processes inherit the
    variable) and whose traced TorchScript copy does not: TorchScript is faster by construction.
    Its processes run one thread (ONE_THREAD): on a loaded machine a parallel region waits for a
    descheduled thread, and a 0.05 ms TorchScript call then took 60-100 ms here, outlasting the sleeps."""
    monkeypatch.setenv("AUTOTIACC_TEST_SLOW_EAGER_S", "0.01")
    return load_workload(models_dir / "slow_lowered.py", batch_size=4)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_warm_alternating_processes_and_the_tuner_result_format(slow_eager):
    res = measure_alternating(slow_eager, {"ts": TS, "bad": {"precision": {"mode": "int8_nonsense"}}}, rounds=4,
                              window_s=0.05, warmup_s=0.1, env=ONE_THREAD)
    assert res.rounds == 4 and set(res.windows) == {BASELINE, "ts"}
    assert len(res.windows["ts"]) == len(res.windows[BASELINE]) == 4
    assert "bad" in res.failures  # an invalid candidate is dropped with its reason, the rest goes on
    # each window's figure is the median of its calls; the speed-up the ratio of the window medians
    assert all(w >= 20.0 for w in res.windows[BASELINE])  # two 10 ms sleeps per eager forward
    assert res.speedup("ts") == pytest.approx(statistics.median(res.windows[BASELINE])
                                              / statistics.median(res.windows["ts"]))
    assert res.speedup("ts") > 2 and res.p_faster("ts") < 0.05  # 4 windows each, none overlapping
    # the baseline's windows come from BASELINE_PROCESSES processes in turn (one per round at most),
    # a candidate's from one
    assert len(set(res.pids[BASELINE])) == min(BASELINE_PROCESSES, 4)
    assert len(set(res.pids["ts"])) == 1 and not set(res.pids["ts"]) & set(res.pids[BASELINE])
    lo, hi = res.speedup_range("ts")
    assert 2 < lo <= hi and res.to_dict()["speedup_range"]["ts"] == [lo, hi]
    out = evaluate_alternating(slow_eager, {"ts": TS}, target_s=0.2, window_s=0.05, warmup_s=0.1, timeout=300,
                               env=ONE_THREAD)
    assert out.ok, out.error
    cand = out.value["candidates"]["ts"]
    assert cand["status"] == "ok" and cand["accuracy"]["ok"] and cand["speedup"] > 2 and cand["faster"] is True
    assert out.value["alternating"]["rounds"] >= 5 and out.value["baseline"]["n"] > 0


@pytest.mark.slow
def test_fresh_alternating_processes(workload):
    res = measure_alternating(workload, {"ts": TS}, rounds=2, window_s=0.05, warmup_s=0.1, fresh=True)
    assert res.rounds == 2 and len(res.windows["ts"]) == 2 and not res.failures
    assert len(set(res.pids["ts"])) == 2  # a fresh process per window


def test_noise_test_is_scipys_mann_whitney():
    from scipy.stats import mannwhitneyu

    r = AlternatingResult(windows={BASELINE: [10.0, 10.5, 9.8, 10.2, 10.1], "x": [5.0, 5.2, 4.9, 5.1, 5.3]})
    assert r.p_faster("x") == pytest.approx(mannwhitneyu(r.windows["x"], r.windows[BASELINE],
                                                         alternative="less").pvalue)
    assert r.p_faster("x") < 0.01 and r.speedup("x") == pytest.approx(10.1 / 5.1)


@pytest.mark.slow
def test_a_build_past_its_measured_cost_fails_alone(models_dir, monkeypatch):
    """A candidate whose rebuild takes far longer than the search measured (its derived limit,
    `engine.limits.build_limit`, not a fixed number of seconds) is dropped by timeout; the
    baseline and the other candidates are still measured."""
    import time

    monkeypatch.setenv("AUTOTIACC_TEST_SLOW_LOWERED_S", "30")  # each bf16 forward sleeps: the build hangs
    slow = load_workload(models_dir / "slow_lowered.py", batch_size=4)
    costs = {BASELINE: limits.Cost(build_s=0.1, forward_s=1e-4), "slow": limits.Cost(build_s=0.1, forward_s=1e-4),
             "ts": limits.Cost(build_s=0.5, forward_s=1e-4)}
    t0 = time.monotonic()
    res = measure_alternating(slow, {"slow": {"precision": {"mode": "bf16_weights"}}, "ts": TS}, rounds=4,
                              window_s=0.05, warmup_s=0.1, costs=costs)
    assert "slow" in res.failures and res.failures["slow"].startswith("timeout")
    assert res.rounds == 4 and len(res.windows["ts"]) == 4 and len(res.windows[BASELINE]) == 4
    assert time.monotonic() - t0 < 30  # the hung build did not hold the final for its 30 s


@pytest.mark.slow
def test_the_deadline_cuts_the_final_rather_than_be_overrun(workload):
    """Nothing starts or runs past the deadline: asked for far more rounds than fit, the final
    stops at its deadline and says what it cut."""
    import time

    t0 = time.monotonic()
    res = measure_alternating(workload, {"ts": TS}, rounds=10_000, window_s=0.05, warmup_s=0.1,
                              deadline=time.monotonic() + 12.0)
    assert time.monotonic() - t0 < 12.0 + 3.0  # a window and the processes' close past it, no more
    assert res.cut.startswith("the deadline ended the rounds") and 0 < res.rounds < 10_000
