"""The report's "Where the budget went" section, from the per-session budget split that
run.json records (`engine.budget.Budget.summary`)."""
from __future__ import annotations

from typing import Any


def budget_section(run: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The report's "Where the budget went" section, when run.json recorded it."""
    lines = budget_lines(run.get("sessions") or [])
    return [("Where the budget went", lines)] if lines else []


def budget_lines(sessions: list[dict[str, Any]]) -> list[str]:
    """One line per session that recorded its budget."""
    names = {"profile_s": "profile", "build_s": "builds", "timing_s": "timing",
             "trial_other_s": "rest of the trials (worker start, baseline, accuracy, failures)",
             "final_s": "final re-measurement", "other_s": "model check, Optuna, records, idle"}
    lines = []
    for i, s in enumerate(sessions, 1):
        b = s.get("budget")
        if not isinstance(b, dict) or not b.get("wall_s"):
            continue
        wall = float(b["wall_s"])
        parts = [f"{label} {float(b.get(k) or 0):.1f} s ({100 * float(b.get(k) or 0) / wall:.0f} %)"
                 for k, label in names.items()]
        overhead = sum(float(b.get(k) or 0) for k in ("profile_s", "final_s", "other_s"))
        lines.append(f"- session {i} ({wall:.0f} s): " + ", ".join(parts)
                     + f"; outside the trials (profile, final re-measurement, the rest): {100 * overhead / wall:.0f} %")
    return lines
