"""The final re-measurement of a tune, and of `verify`: the top candidates and the baseline,
each alone in its own process, windows taken in turns (`fidelity.measure_alternating`), in
`evaluate`'s result format, each candidate with its verdict on the machine's load and the span
of its rounds (`machine_load.reliability`).
"""
from __future__ import annotations

import math
import time
from typing import Any

from . import limits
from .bench import Bench, OneShape
from .fidelity import BASELINE, FINAL_ROUNDS, FINAL_WINDOW_S, MIN_ROUNDS, measure_alternating
from .workers import Outcome

FINAL_BUSY_WAIT_S = 1.0  # the most one window of a final waits for a busy machine to go quiet
CLOSE_S = 1.0  # kept at the end of a final for closing its processes


def final_rounds(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S) -> int:
    """Rounds of the final: `target_s` of windows in all, at least `FINAL_ROUNDS`."""
    return max(FINAL_ROUNDS, math.ceil(target_s / (window_s * (n_candidates + 1))))


def final_rounds_s(n_candidates: int, target_s: float, window_s: float = FINAL_WINDOW_S, *,
                   forwards_s: list[float] | None = None, rounds: int | None = None) -> float:
    """Seconds the final's rounds take: each window (`limits.window_s`: `window_s`, or its fewest
    calls of each variant's forward in `forwards_s`, the baseline's included), plus ~20 % for
    the call and the switch; as many rounds as the final takes (it stops once each variant's
    windows took its share of `target_s`, `FINAL_ROUNDS` at least), or `rounds`."""
    windows = [limits.window_s(window_s, f) for f in forwards_s] if forwards_s else [window_s] * (n_candidates + 1)
    if rounds is None:
        share_met = max(FINAL_ROUNDS, math.ceil(target_s / (n_candidates + 1) / min(windows)))
        rounds = min(final_rounds(n_candidates, target_s, window_s), share_met)
    return rounds * sum(windows) * 1.2


def evaluate_alternating(workload, candidates: dict[str, dict], *, device: str = "cpu", tolerance: float = 2e-2,
                         target_s: float = 6.0, window_s: float = FINAL_WINDOW_S, warmup_s: float = 2.0,
                         env: dict[str, str] | None = None, timeout: float = 300.0, bench: Bench | None = None,
                         costs: dict[str, limits.Cost] | None = None,
                         busy_wait_s: float = FINAL_BUSY_WAIT_S) -> Outcome:
    """The final re-measurement of a tune: `candidates` (the best first) and the baseline, each
    in its own process (`measure_alternating`, with `bench`: one shape by default, or a traffic
    mix; `costs`: what each was measured to cost, see there), in `evaluate`'s result format
    plus the bench's figures; a candidate is `faster` when its windows beat the baseline's beyond
    noise (Mann-Whitney U, 5 %) by 2 % or more, and carries its `reliability` verdict. Ends
    within `timeout`: what does not fit is cut (fewer baseline processes, candidates, rounds)."""
    bench = bench or OneShape()
    deadline = time.monotonic() + timeout - CLOSE_S
    rounds = final_rounds(len(candidates), target_s, window_s)
    res = measure_alternating(workload, candidates, device=device, rounds=rounds, window_s=window_s,
                              warmup_s=warmup_s, tolerance=tolerance, env=env, timeout_s=timeout,
                              deadline=deadline, target_s=target_s / (len(candidates) + 1), bench=bench,
                              costs=costs, busy_wait_s=busy_wait_s)
    if BASELINE in res.failures or res.rounds < MIN_ROUNDS:
        why = res.failures.get(BASELINE) or (f"cut by the budget after {res.rounds} rounds (it needs "
                                             f"{MIN_ROUNDS} to judge the noise)")
        return Outcome("exception", error=why, seconds=res.seconds)
    from ..measure import Timing

    out: dict[str, Any] = {}
    for name, values in candidates.items():
        r: dict[str, Any] = {"knobs": values, **res.info.get(name, {})}
        if name in res.failures:
            r.update(status="failed", reason=res.failures[name])
        else:
            ratio = 1 / res.speedup(name)
            r.update(status="ok", ratio=ratio, speedup=1 / ratio, p_faster=res.p_faster(name),
                     faster=ratio < 0.98 and res.p_faster(name) < 0.05, reliability=res.verdict(name),
                     timing=Timing(res.samples[name], load=res.load(name)).to_dict())
            r.update(bench.figures(res, name))  # may reject it (a traffic mix: p99 over the budget)
        out[name] = r
    base = Timing(res.samples[BASELINE], load=res.load(BASELINE)).to_dict()
    return Outcome("ok", value={"baseline": base, "candidates": out, "alternating": res.to_dict(),
                                **bench.summary(res)}, seconds=res.seconds)
