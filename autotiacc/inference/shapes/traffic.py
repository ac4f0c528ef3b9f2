"""Production traffic: the shape mix a model is served with, and its histogram.

Traffic comes from the user's `traffic()` in model.py or from `--traffic FILE` (CSV or JSON
with the same columns): one row per shape, `batch_size`, one column per named dynamic dim
(e.g. `seq_len`) and `weight` (any positive number; weights are normalised).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ...errors import UserInputError


@dataclass(frozen=True)
class Shape:
    """One request shape of the traffic mix and its share of requests."""

    batch_size: int
    dims: tuple[tuple[str, int], ...]  # sorted (name, size) pairs: hashable and JSON-friendly
    weight: float = 1.0

    @property
    def dim_dict(self) -> dict[str, int]:
        return dict(self.dims)

    def size(self, name: str) -> int:
        return self.batch_size if name == "batch_size" else self.dim_dict[name]

    def key(self) -> str:
        return "x".join([f"b{self.batch_size}"] + [f"{n}{v}" for n, v in self.dims])

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, **self.dim_dict, "weight": self.weight}


def _positive_int(value: Any, column: str, row: int, origin: str) -> int:
    try:
        f = float(value)
        if f != int(f) or f <= 0:
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise UserInputError(f"{origin}: row {row}: `{column}` got {value!r}; use a positive integer.") from None


def parse_traffic(rows: Iterable[Any], *, origin: str = "traffic()") -> list[Shape]:
    """Validate rows of {batch_size, <dims>..., weight} into shapes; duplicates are merged.

    Every row must name the same dims. A missing `weight` counts as 1.
    """
    shapes: dict[tuple, float] = {}
    names: tuple[str, ...] | None = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserInputError(f"{origin}: row {i} is {type(row).__name__}; each row must be a mapping like "
                                 "{'batch_size': 1, 'seq_len': 37, 'weight': 0.6}.")
        if "batch_size" not in row:
            raise UserInputError(f"{origin}: row {i} {row!r} has no `batch_size`; add it (1 for single requests).")
        weight_raw = row.get("weight", 1.0)
        try:
            weight = float(weight_raw)
        except (TypeError, ValueError):
            weight = -1.0
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise UserInputError(f"{origin}: row {i}: `weight` got {weight_raw!r}; use a positive finite number.")
        dims = tuple(sorted((str(k), _positive_int(v, str(k), i, origin))
                            for k, v in row.items() if k not in ("batch_size", "weight") and v not in (None, "")))
        row_names = tuple(n for n, _ in dims)
        if names is None:
            names = row_names
        elif row_names != names:
            raise UserInputError(f"{origin}: row {i} names dims {list(row_names)} but row 0 names {list(names)}; "
                                 "every row must give the same dynamic dims.")
        key = (_positive_int(row["batch_size"], "batch_size", i, origin), dims)
        shapes[key] = shapes.get(key, 0.0) + weight
    if not shapes:
        raise UserInputError(f"{origin}: the traffic is empty; give at least one row with batch_size and weight.")
    total = sum(shapes.values())
    return [Shape(b, dims, w / total) for (b, dims), w in sorted(shapes.items())]


def load_traffic_file(path: str | Path) -> list[Shape]:
    """Read `--traffic FILE`: CSV with a header row, or JSON (a list of rows)."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"`--traffic` got {str(path)!r}: no such file; give a CSV or JSON file of "
                             "batch_size, <dims>, weight rows.")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"`--traffic` {p}: not valid JSON ({exc}).") from None
        if isinstance(rows, dict) and "traffic" in rows:
            rows = rows["traffic"]
        if not isinstance(rows, list):
            raise UserInputError(f"`--traffic` {p}: JSON must be a list of rows like "
                                 "{\"batch_size\": 1, \"seq_len\": 37, \"weight\": 0.6}.")
    elif p.suffix.lower() == ".csv":
        rows = [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
                for r in csv.DictReader(text.splitlines())]
    else:
        raise UserInputError(f"`--traffic` got {p.name!r}: use a .csv or .json file.")
    return parse_traffic(rows, origin=f"`--traffic` {p}")


def workload_traffic(workload, traffic_file: str | Path | None = None) -> list[Shape] | None:
    """The traffic to tune for: `--traffic FILE` wins over model.py's `traffic()`; None = static shapes."""
    if traffic_file is not None:
        return load_traffic_file(traffic_file)
    facts = getattr(workload, "facts", None)
    if facts is not None:  # what traffic() returned in the check's child: the tuner never imports model.py
        if facts.traffic_error:
            raise UserInputError(facts.traffic_error)
        rows = facts.traffic
        if rows is None:
            return None
    else:
        fn = workload.user_hook("traffic")
        if fn is None:
            return None
        try:
            rows = fn()
        except Exception as exc:
            raise UserInputError(f"{workload.path}: traffic() raised {type(exc).__name__}: {exc}") from exc
    return parse_traffic(rows, origin=f"{workload.path}: traffic()")


def dim_names(traffic: list[Shape]) -> list[str]:
    """`batch_size` first, then the named dims."""
    return ["batch_size"] + [n for n, _ in traffic[0].dims]


def histogram(traffic: list[Shape], name: str) -> dict[int, float]:
    """Traffic share per size of one dim (`batch_size` or a named dim), sorted by size."""
    out: dict[int, float] = {}
    for s in traffic:
        out[s.size(name)] = out.get(s.size(name), 0.0) + s.weight
    return dict(sorted(out.items()))


def traffic_to_rows(traffic: list[Shape]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in traffic]
