"""What a tune's plan says, from the engine's decision (`engine.task.Decision`): the baseline and
why nothing beat it, the search's best when the final failed, or the final's verdict on its best
candidate; each figure with whether it can be trusted (`machine_load.reliability`)."""
from __future__ import annotations

from typing import Any

from ..engine.loop import failure_note
from ..engine.task import Decision, finalist_name
from ..hardware import usable_cores
from ..knobs import configs_from_params, describe
from ..machine_load import reliability, unreliable_sentence
from .plan import Plan
from .twins import final_summary


def fill_plan(plan: Plan, decision: Decision, trials: list, *, shape_tuning: Any,
              final_alternating: dict[str, Any] | None) -> None:
    """Fill `plan` (its identity and the search's baseline figure already set) from `decision`;
    `shape_tuning` records the chosen buckets, `final_alternating` is the final's record."""
    if decision.kind == "nothing":
        plan.fell_back, plan.speedup = True, 1.0
        plan.note = f"no candidate beat the baseline ({_why_none(trials)}); keeping the baseline. " + failure_note(trials)
    elif decision.kind == "final_failed":  # keep best-so-far from the search rather than ending with nothing
        _search_best(plan, decision, shape_tuning)
    else:
        _from_final(plan, decision, shape_tuning, final_alternating)


def _search_best(plan: Plan, decision: Decision, shape_tuning: Any) -> None:
    t = decision.trial
    a = t.user_attrs
    plan.knobs, plan.speedup, plan.compile_s = configs_from_params(a["knobs"]), a.get("speedup"), a.get("build_s")
    plan.baseline = {"median_ms": a.get("baseline_ms"), "source": "search"}
    plan.best = {"median_ms": a.get("latency_ms"), "p90_ms": a.get("p90_ms"), "spread": a.get("spread"),
                 "source": "search"}
    shape_tuning.record(plan, a["knobs"], a)
    plan.note = (f"final re-measurement failed ({decision.reason}); the plan keeps trial {t.number}, "
                 "the best of the search, with its search-time figures.")
    load = {k: a.get(k) for k in ("busy", "load1", "others_cores")} if a.get("busy") is not None else None
    _judge(plan, reliability({**load, "cores": usable_cores()} if load else None))


def _from_final(plan: Plan, decision: Decision, shape_tuning: Any, alt: dict[str, Any] | None) -> None:
    final, t = decision.final, decision.trial
    plan.baseline = final.baseline.to_dict()
    if alt:
        plan.extra["final_alternating"] = alt
    plan.extra["final"] = final_summary(final)
    plan.fell_back, plan.speedup = True, 1.0
    if decision.kind == "all_failed":
        plan.note = "every top candidate failed the final re-measurement; the plan keeps the baseline."
        return
    res, cand = decision.result, decision.timing
    if decision.kind == "not_faster":
        plan.best = cand.to_dict()
        plan.note = (f"best candidate ({describe(configs_from_params(res['knobs']))}) was "
                     f"{res.get('speedup', final.baseline.median / cand.median):.2f}x the baseline in the final "
                     "re-measurement: not faster beyond noise, so the plan keeps the baseline.")
        _judge(plan, res.get("reliability"))
        return
    plan.fell_back = False
    plan.knobs = configs_from_params(res["knobs"])
    plan.best, plan.speedup = cand.to_dict(), res.get("speedup", final.baseline.median / cand.median)
    plan.accuracy, plan.compile_s = res.get("accuracy"), res.get("build_s")
    plan.extra.update(res.get("engine_records") or {})  # int8_static's scales: `plan.apply` replays them
    shape_tuning.record(plan, res["knobs"], res)
    how = "each alone in its own process, measured in turns" if alt else "interleaved in a fresh process"
    spread = ((alt or {}).get("speedup_range") or {}).get(res.get("variant", finalist_name(t.number)))
    if spread:  # each process runs at its own pace: what one round (a process of each) gave
        how += f"; {alt['rounds']} rounds, {spread[0]:.2f}x to {spread[1]:.2f}x each"
    plan.note = (f"{(plan.speedup - 1) * 100:.0f} % faster than the baseline (eager fp32), "
                 f"re-measured {how}, in the environment of the tune.")
    _judge(plan, res.get("reliability"))


def _why_none(trials: list) -> str:
    """What stopped every candidate, counted by status (the accuracy guard is one reason of several)."""
    counts: dict[str, int] = {}
    for x in trials:
        status = x.user_attrs.get("status")
        if status not in ("ok", "duplicate", "skipped", None) and not x.user_attrs.get("baseline"):
            counts[status] = counts.get(status, 0) + 1
    ok = sum(1 for x in trials if x.user_attrs.get("status") == "ok" and not x.user_attrs.get("baseline"))
    if ok:
        counts["not faster"] = ok
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none was measured in the budget"


def _judge(plan: Plan, verdict: dict[str, Any] | None) -> None:
    """Record whether the plan's figure can be trusted (`machine_load.reliability`): a typed field,
    and, when it cannot, the reason at the end of its note."""
    if not verdict:
        return
    plan.reliable, plan.reliability = bool(verdict["reliable"]), verdict
    plan.note += unreliable_sentence(verdict)
