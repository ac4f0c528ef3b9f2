"""Parse human durations such as `90s`, `10m`, `1h30m` (the `--budget` syntax)."""
from __future__ import annotations

import re

from .errors import BudgetError

_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float | int, *, name: str = "--budget") -> float:
    """Return seconds for `text`; a bare number means seconds.

    Raises `BudgetError` naming `name` when the text is not of the form `90s`, `10m`, `1h30m`.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", raw):
            seconds = float(raw)
        else:
            pos, seconds, seen = 0, 0.0, []
            for m in _PART.finditer(raw):
                if m.start() != pos:
                    break
                if m.group(2) in seen:
                    break
                seen.append(m.group(2))
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            order_ok = seen == sorted(seen, key="hms".index)
            if not raw or pos != len(raw) or not order_ok:
                raise BudgetError(
                    f"`{name}` got {text!r}: use a duration such as 90s, 10m, 1h or 1h30m."
                )
    if seconds <= 0:
        raise BudgetError(f"`{name}` got {text!r}: the duration must be positive, e.g. 5m.")
    return seconds


def format_duration(seconds: float) -> str:
    """Inverse of `parse_duration` for display: 5400 -> '1h30m', 95 -> '1m35s'."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")
    return out


def suggest_budget(*, setup_s: float, trial_s: float, final_s: float, trials: int = 6) -> str:
    """A budget that measures the baseline and a few candidates, from what this run measured:
    the set-up (model check, profile), one trial and the final re-measurement; whole minutes."""
    import math

    return format_duration(60 * math.ceil((setup_s + trials * trial_s + final_s) / 60))
