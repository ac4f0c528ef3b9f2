"""Twins: variants of a finalist that the final re-measurement adds for options the search
cannot judge. The search times a candidate interleaved with the baseline in one process, which
is fair for everything but what acts between calls: ONNX Runtime's spinning pool threads (see
autotiacc.knobs.ort). The final times each variant alone in its own process, so there a
finalist and its spinning twin are judged as each will run, and the plan keeps the twin only
when its windows beat the finalist's beyond noise (spinning burns cores a server may need).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.task import finalist_name
from ..knobs.ort import spinning_twin

TWIN = "_spinning"  # a twin's variant name: its finalist's, then this


@dataclass
class TwinTrial:
    """A twin as `final_reserve` counts it: its finalist's figures, its own knobs."""

    number: int
    user_attrs: dict[str, Any] = field(default_factory=dict)


def with_twins(cands: dict[str, dict], space: dict[str, Any]) -> dict[str, dict]:
    """`cands` ({variant name: knob values}) and, after each finalist that has one, its twin."""
    out: dict[str, dict] = {}
    for name, values in cands.items():
        out[name] = values
        twin = spinning_twin(values, space)
        if twin is not None:
            out[name + TWIN] = twin
    return out


def twin_trials(tops: list, space: dict[str, Any]) -> list[TwinTrial]:
    """The twins the final will add for `tops` (for its time estimate)."""
    return [TwinTrial(t.number, {**t.user_attrs, "knobs": twin}) for t in tops
            if (twin := spinning_twin(t.user_attrs.get("knobs") or {}, space)) is not None]


def merge_twins(results: dict[str, dict], windows: dict[str, list[float]]) -> dict[str, dict]:
    """One result per finalist: its twin's where the twin ran and its windows were faster than
    the finalist's beyond noise (Mann-Whitney U, 2 % or more), else its own; each merged result
    says what its twin gave (`twin`) and which variant it is (`variant`)."""
    from ..measure import Timing, faster_beyond_noise

    out: dict[str, dict] = {}
    for name, own in results.items():
        if name.endswith(TWIN):
            continue
        twin = results.get(name + TWIN)
        if twin is None:
            out[name] = {**own, "variant": name}
            continue
        wins = twin.get("status") == "ok" and (own.get("status") != "ok" or faster_beyond_noise(
            Timing(windows.get(name + TWIN) or [1.0]), Timing(windows.get(name) or [1.0])))
        chosen, variant = (twin, name + TWIN) if wins else (own, name)
        out[name] = {**chosen, "variant": variant,
                     "twin": {"spinning": {"status": twin.get("status"), "ratio": twin.get("ratio"),
                                           "reason": twin.get("reason"), "kept": wins}}}
    return out


def final_summary(final) -> dict[str, Any]:
    """The plan's record of the final (`engine.task.FinalMeasure`): each finalist's status,
    ratio, reason, build seconds and, where the final timed one, what its spinning twin gave."""
    return {finalist_name(n): {**{k: r.get(k) for k in ("status", "ratio", "reason", "build_s")},
                           **({"twin": r["twin"]} if "twin" in r else {})}
            for n, (_, _, r) in final.candidates.items()}
