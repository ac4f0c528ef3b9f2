"""Markdown text helpers shared by every report (inference, training, profile, shapes, compare)."""
from __future__ import annotations

import math
from typing import Any


def fmt(x: Any, spec: str = ".3g") -> str:
    """One table cell: numbers by `spec`, None/NaN as a dash, anything else as str."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; a `|` inside a cell becomes `/`."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out


def reliability_lines(plan: dict[str, Any]) -> list[str]:
    """Whether the plan's figure can be trusted (its `reliable` and `reliability` fields; see
    `machine_load`), as report lines: none for a plan that was not judged (older plans)."""
    verdict = plan.get("reliability") or {}
    load = verdict.get("load") or {}
    seen = (f" ({load.get('busy_windows', 0)} of {load['windows']} timing windows busy, load up to "
            f"{fmt(load.get('load1'), '.1f')} on {load.get('cores')} cores)") if load.get("windows") else ""
    if plan.get("reliable") is False:
        return ["", "**Not reliable:** " + "; ".join(verdict.get("reasons") or []) + ". Re-measure it on a quiet "
                "machine (`autotiacc verify`)."]
    if plan.get("reliable"):
        return ["", f"Measured while the machine was quiet enough{seen}."]
    return []


def seed_order_section(run: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Which reduced types this device computes in natively, and the stage-1 seeds moved last for it."""
    order = run.get("seed_order")
    if not isinstance(order, dict):  # runs from before this record
        return []
    units = "; ".join(f"{k}: {'/'.join(v) if v else 'none'}" for k, v in (order.get("native_types") or {}).items())
    lines = [f"Units for reduced types here: {units}."]
    moved = order.get("moved_last") or []
    if moved:
        lines += ["", "Seeds moved to the end of stage 1 (measured after every native one; not removed):", ""]
        lines += table(["seed", "why"], [[m.get("seed"), "; ".join(m.get("why") or [])] for m in moved])
    else:
        lines.append("No seed was moved: each computes in a type this device runs natively.")
    return [("Stage 1 and this hardware", lines)]
