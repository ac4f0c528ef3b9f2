"""Typed configs as JSON: the dataclass base every knob and engine option config derives from,
their (de)serialisation as {"_type", "_version", "_data"}, and the one type check that plan,
strategy and artifact loading share. `_type` is resolved only from the classes a caller allows,
never imported by name from a file."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import PlanError, UserInputError

MAX_THREADS = 4096  # beyond any machine: a larger thread or stream count is a typo or a corrupt plan


def check_choice(field: str, value: Any, choices: typing.Iterable[str], note: str = "") -> None:
    """A config field that takes one of `choices`: anything else is a ValueError naming them
    (`note`, e.g. where another value lives, is added to the message)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{field}` got {value!r}: use one of {', '.join(choices)}{note}.")


@dataclass(frozen=True)
class KnobConfig:
    """Base of every knob config. Subclasses are frozen dataclasses with a class `version`."""

    version: ClassVar[int] = 1


def config_to_dict(cfg: KnobConfig) -> dict[str, Any]:
    return {"_type": type(cfg).__name__, "_version": cfg.version, "_data": dataclasses.asdict(cfg)}


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a dataclass field annotation: the one type check that
    plan and strategy loading share. bool is never an int here, a float never an int, and a
    float must be finite; containers are checked one level deep for their item type."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple or hint is list or origin is list:
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if hint is dict or origin is dict:
        key, item = args if args else (Any, Any)
        return isinstance(value, dict) and all(matches_type(k, key) and matches_type(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """`int`, `bool or None`, `list of str`: an annotation as a message shows it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (tuple, list):
        return "list" + (f" of {type_name(args[0])}" if args and args[0] is not Ellipsis else "")
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def field_type_errors(cls: type, data: dict[str, Any]) -> list[str]:
    """One message per field of dataclass `cls` whose value in `data` does not fit its annotation."""
    hints = typing.get_type_hints(cls)
    return [f"`{name}` got {value!r} ({type(value).__name__}), expected {type_name(hints[name])}"
            for name, value in data.items() if name in hints and not matches_type(value, hints[name])]


def config_from_dict(d: dict[str, Any], allowed: dict[str, type]) -> KnobConfig:
    """Rebuild a config from JSON; only classes in `allowed` ({class name: class}) are accepted,
    never a name imported from the file. Every field is checked against
    its annotation before the config is built (`"false"` is not a bool, `1.5` not an int)."""
    if not isinstance(d, dict) or "_type" not in d or not isinstance(d.get("_data"), dict):
        raise PlanError(f"knob entry {_short(d)} is not of the form {{'_type', '_version', '_data'}}.")
    cls = allowed.get(d["_type"]) if isinstance(d["_type"], str) else None
    if cls is None:
        raise PlanError(f"knob entry has unknown _type {_short(d['_type'])}; known: {', '.join(sorted(allowed))}.")
    version = d.get("_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PlanError(f"{d['_type']}: `_version` got {_short(version)}, expected a whole number.")
    if version != cls.version:
        warnings.warn(f"{d['_type']} was saved as version {_short(d.get('_version'))}, this autotiacc reads "
                      f"version {cls.version}; applying it anyway.", stacklevel=2)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d["_data"] if k not in names]
    if unknown:
        raise PlanError(f"{d['_type']} has unknown fields {sorted(map(str, unknown))}; known: {', '.join(sorted(names))}.")
    wrong = field_type_errors(cls, d["_data"])
    if wrong:
        raise PlanError(f"{d['_type']}: " + "; ".join(wrong) + ".")
    data = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
            for k, v in d["_data"].items()}
    try:
        return cls(**data)
    except (TypeError, ValueError, UserInputError) as exc:
        raise PlanError(f"{d['_type']}: {exc}") from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
