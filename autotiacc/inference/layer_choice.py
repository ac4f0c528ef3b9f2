"""What the plan and the final take from the per-layer analysis (autotiacc.profiling.sensitivity):
the groups summary a plan records, and the full-precision contender the final adds."""
from __future__ import annotations

from typing import Any


def plan_summary(run_dir) -> list[dict[str, Any]]:
    """What a plan records about the groups: share, allowed modes, why others were excluded."""
    from ..profiling.schema import load_profile

    try:
        prof = load_profile(run_dir)
    except Exception:  # noqa: BLE001 - no profile, nothing to summarise
        return []
    return [{"path": g["path"], "inclusive_share": g.get("inclusive_share"), "allowed": g.get("allowed", []),
             "excluded": {m: s.get("reason", "") for m, s in g.get("sensitivity", {}).items() if not s.get("ok")},
             **({"not_analysed": g["skipped"]} if g.get("skipped") else {})}
            for g in prof.get("sensitivity") or []]


def best_full_precision(top: list, trials: list) -> list:
    """The fastest measured trial that lowers nothing (global fp32, no groups), when `top`
    lacks one: re-measured beside the others at the end, so a plan that lowers layers is
    chosen only if it beats the best all-fp32 configuration side by side."""
    def full(t) -> bool:  # the trial's precision, and that of each shape bucket with its own
        values = t.user_attrs.get("knobs") or {}
        buckets = (values.get("shapes") or {}).get("knobs") or []
        precs = [values.get("precision", {})] + [k.get("precision", {}) for k in buckets]
        return all(p.get("mode", "fp32") == "fp32" and not p.get("groups") for p in precs)

    if not top or any(full(t) for t in top):
        return []
    ok = [t for t in trials if t.user_attrs.get("status") == "ok" and t.value is not None and full(t)
          and not t.user_attrs.get("baseline")]
    return [min(ok, key=lambda t: t.value)] if ok else []
