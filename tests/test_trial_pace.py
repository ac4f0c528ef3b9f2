"""A trial spends its time where it can change the ranking: a hopelessly slow candidate is given
up at its second slow call, and timing stops once the ratio to the baseline is known well enough."""
from __future__ import annotations

import time

import pytest

from autotiacc.inference.evaluate import evaluate
from autotiacc.inference.workload import load_workload
from autotiacc.measure import TooSlow, check_pace, measure_interleaved, median_ratio_interval, warm_up

from .conftest import MODELS


def _sleeper(ms_per_call: list[float]):
    """A callable that sleeps the next figure of `ms_per_call` (the last repeats); counts its calls."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(ms_per_call[min(len(calls), len(ms_per_call)) - 1] / 1e3)
    return fn, calls


def test_warm_up_gives_up_at_the_second_slow_call_in_a_row():
    fn, calls = _sleeper([30.0])
    with pytest.raises(TooSlow) as info:
        warm_up(fn, max_s=5.0, give_up_ms=5.0)
    assert len(calls) == 2 and info.value.value >= 30.0 and info.value.limit == 5.0


def test_one_slow_call_is_not_a_pace():
    # a first call that compiles, a capture on the third: never two slow calls in a row
    fn, calls = _sleeper([40.0, 1.0, 40.0, 1.0, 1.0])
    warm_up(fn, max_s=0.3, give_up_ms=20.0)
    assert len(calls) >= 6
    check_pace([1.0, 9.0], 5.0)
    check_pace([9.0], 5.0)
    with pytest.raises(TooSlow):
        check_pace([1.0, 9.0, 9.0], 5.0)


def test_median_ratio_interval_brackets_the_median():
    assert median_ratio_interval([2.0] * 20, [1.0] * 20) == (2.0, 2.0, 2.0)
    a = [1.0 + 0.01 * i for i in range(41)]  # ratios 1.00 .. 1.40, median 1.20
    lo, med, hi = median_ratio_interval(a, [1.0] * 41)
    assert med == pytest.approx(1.2) and lo < med < hi
    assert hi - lo < 0.15  # ~ +-1 sd of the median's rank, not the whole range
    lo2, _, hi2 = median_ratio_interval(a[::4], [1.0] * len(a[::4]))
    assert hi2 - lo2 > hi - lo  # fewer rounds, wider interval


def test_timing_stops_once_the_ratio_is_settled():
    """With `settle`, the rounds stop at the first check (every 4 rounds from `min_rounds`) at which
    the samples pin the ratio within +-settle: decided by the samples, so the test checks it on
    them, not on the clock (the 120 s window only bounds a bug)."""
    fast, _ = _sleeper([20.0])
    slow, _ = _sleeper([40.0])
    res = measure_interleaved({"base": slow, "cand": fast}, min_rounds=8, target_s=120.0, warmup_s=0,
                              settle=0.05, reference="base")
    n = res["base"].n
    assert n == res["cand"].n >= 8 and n % 4 == 0

    def settled(rounds: int) -> bool:  # the rule, from the docstring: the 95 % interval's half-width
        lo, med, hi = median_ratio_interval(res["cand"].samples_ms[:rounds], res["base"].samples_ms[:rounds])
        return (hi - lo) / (2 * med) <= 0.05

    assert settled(n) and (n == 8 or not settled(n - 4))  # it stopped at the first settled check
    # (20 and 40 ms sleeps: a loaded machine's late wake-ups add the same few ms to both)
    assert res["cand"].median / res["base"].median == pytest.approx(0.5, rel=0.2)
    # without `settle`, the whole window is used (a lower bound: a loaded machine only lengthens it)
    t0 = time.perf_counter()
    measure_interleaved({"base": slow, "cand": fast}, min_rounds=2, target_s=0.4, warmup_s=0)
    assert time.perf_counter() - t0 >= 0.4


def test_initial_samples_count_towards_the_rounds():
    fn, calls = _sleeper([1.0])
    first = measure_interleaved({"a": fn}, min_rounds=6, target_s=0, warmup_s=0)
    before = len(calls)
    res = measure_interleaved({"a": fn}, min_rounds=10, target_s=0, warmup_s=0, initial=first)
    assert res["a"].n == 10 and res["a"].samples_ms[:6] == first["a"].samples_ms
    assert len(calls) - before < 10  # 4 timed calls and the warm-up's, not 10 more


def test_warm_up_calls_are_the_callers_choice():
    """By default each callable is warmed up with 3 calls at least, even at warmup_s=0; a caller
    whose callables have just run asks for fewer (the profile's quick looks: one each)."""
    for min_warmup, warm_calls in ((3, 3), (1, 1), (0, 0)):
        fn, calls = _sleeper([0.1])
        res = measure_interleaved({"a": fn}, min_rounds=4, max_rounds=4, target_s=0, warmup_s=0,
                                  min_warmup=min_warmup)
        assert res["a"].n == 4 and len(calls) == 4 + warm_calls


def test_a_hopeless_candidate_stops_after_two_test_calls():
    """Through the real trial path: with a pruning bound no candidate can meet (1e-6x the
    baseline's time), an eager candidate is pruned at its second call on the test data,
    before any warm-up or timing. (At 0.01x a loaded machine let it through: a baseline call
    preempted for 100x its time made the same model's next calls look fast enough.)"""
    w = load_workload(MODELS / "placement.py")
    calls = w._user.CALLS
    calls.clear()
    res = evaluate(w, {"same": {}}, device="cpu", target_s=0.2, warmup_s=0.1, prune_above=1e-6)
    r = res["candidates"]["same"]
    assert r["status"] == "pruned" and "two calls in a row" in r["reason"], r
    assert "timing" not in r
    per_model = {}
    for model_id, _, _ in calls:
        per_model[model_id] = per_model.get(model_id, 0) + 1
    # the candidate's own copy: its build's first call, then two test batches, then nothing
    assert sorted(per_model.values())[0] == 3, per_model
    assert res["baseline"]["n"] >= 1  # the baseline's pace still goes into the trial's record


def test_a_wrong_answer_outranks_the_pace():
    """A candidate both hopelessly slow and wrong (fp16 overflows this model's `big` layer to
    inf on the first test batch) is rejected for its accuracy, not pruned for its pace: the
    report must say it can never be used, whatever the machine's speed."""
    w = load_workload(MODELS / "fp16_overflow.py")
    res = evaluate(w, {"fp16": {"precision": {"mode": "fp16_weights"}}}, device="cpu", target_s=0.2,
                   warmup_s=0.1, prune_above=0.01)
    r = res["candidates"]["fp16"]
    assert r["status"] == "rejected" and not r["accuracy"]["ok"], r
    assert "two calls in a row" not in r["reason"]
