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
