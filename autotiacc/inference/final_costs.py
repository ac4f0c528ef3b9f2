"""What the final re-measurement of one input shape costs, from the search's measured figures:
the costs its limits derive from (`engine.limits`), and the time the search keeps for it."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..engine import limits
from ..engine.task import finalist_name
from ..engine.fidelity import BASELINE_PROCESSES, MIN_ROUNDS, final_rounds_s


def final_costs_of(tops: list, check_s: float) -> dict[str, limits.Cost]:
    """What each of the trials `tops` (under `trial_<number>`) and the baseline were measured to
    cost: a candidate's build (its trial's, plus `limits.FRESH_COMPILE_S` for a compiled one)
    and warm forward; the baseline's build is the model check's (`check_s`), its forward the
    trials' slowest baseline median."""
    base_ms = max((float(t.user_attrs.get("baseline_ms") or 0.0) for t in tops), default=0.0)
    out = {"baseline": limits.Cost(build_s=check_s, forward_s=base_ms / 1e3)}
    for t in tops:
        a = t.user_attrs
        compiled = (a.get("knobs") or {}).get("execution", {}).get("backend") == "compile"
        out[finalist_name(t.number)] = limits.Cost(
            build_s=float(a.get("build_s") or 0.0) + (limits.FRESH_COMPILE_S if compiled else 0.0),
            forward_s=float(a.get("latency_ms") or base_ms) / 1e3)
    return out


def test_batches_of(trials: list) -> int:
    """How many test batches a process checks, as the trials recorded it."""
    return max((int(t.user_attrs.get("test_batches") or 0) for t in trials), default=0) or limits.TEST_BATCHES


def one_shape_reserve(tops: list, check_s: float, final_measure_s: float, *, least: bool = False) -> float:
    """Seconds the final of `tops` needs: a process per candidate, built one after another (the
    model, its outputs on the test data, the candidate's build and check), and the baseline's
    processes (`limits.baseline_processes`: the model alone), each warming up alone
    (`limits.warmup_s`); then the rounds (`engine.fidelity.final_rounds_s`). All from the trials'
    measured figures (`final_costs_of`), as the final's limits are. `least`: what the final
    cannot do without (one baseline process, `MIN_ROUNDS` rounds); it cuts the rest to fit."""
    costs = final_costs_of(tops, check_s)
    base, n = costs["baseline"], test_batches_of(tops)
    cands = [costs[finalist_name(t.number)] for t in tops]
    forwards = [base.forward_s] + [c.forward_s for c in cands]
    rounds = final_rounds_s(len(tops), final_measure_s, forwards_s=forwards, rounds=MIN_ROUNDS if least else None)
    eager = limits.final_process_s(None, base, n)
    processes = 1 if least else limits.baseline_processes(BASELINE_PROCESSES, eager, rounds)
    return sum(limits.final_process_s(c, base, n) for c in cands) + processes * eager + rounds


def pending_stand_in(baseline_trial: Any, check_s: float) -> SimpleNamespace:
    """The trial about to run, as the final would re-measure it if it joined the tops: built like
    the baseline and twice as fast (one that joins is faster than the baseline; a slower guess
    would keep the search from measuring it at all on a slow model, and the final's deadline cuts
    what the guess misses)."""
    a = baseline_trial.user_attrs
    return SimpleNamespace(number=-1, user_attrs={
        "baseline_ms": a.get("baseline_ms"), "latency_ms": float(a.get("baseline_ms") or 0.0) / 2, "knobs": {},
        "build_s": check_s, "test_batches": a.get("test_batches")})
