"""Declarative search-space presets (YAML) shipped as package data, or a user's own file."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError

_FIELDS = {"name": str, "description": str, "objective": str, "trial_timeout_s": float, "measure_s": float,
           "final_measure_s": float, "final_top_k": int, "patience": int, "prune_factor": float,
           "max_trial_share": float, "profile_share": float, "task": str}


@dataclass
class Strategy:
    name: str
    description: str = ""
    task: str = "inference"  # or "training": which registered knobs it names
    objective: str = "latency"
    trial_timeout_s: float = 300.0
    measure_s: float = 2.0
    final_measure_s: float = 6.0
    final_top_k: int = 3
    patience: int = 30
    prune_factor: float = 2.0
    max_trial_share: float = 0.35  # no trial may run longer than this share of the budget
    profile_share: float = 0.1  # the profile and sensitivity pass takes at most this share
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    enqueue: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def space(self, knob: str) -> dict[str, Any]:
        return self.knobs.get(knob, {})


def builtin_strategies() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("autotiacc.strategies").iterdir() if p.name.endswith(".yaml"))


def load_strategy(name_or_path: str) -> Strategy:
    """A built-in preset by name, or a YAML file path; errors name the fix."""
    p = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or p.exists():
        if not p.is_file():
            raise UserInputError(f"`--strategy` file {name_or_path!r} does not exist.")
        text, origin = p.read_text(encoding="utf-8"), str(p)
    else:
        res = resources.files("autotiacc.strategies") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UserInputError(f"`--strategy` got {name_or_path!r}: use one of {', '.join(builtin_strategies())} "
                                 "or a path to a .yaml file.")
        text, origin = res.read_text(encoding="utf-8"), name_or_path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserInputError(f"strategy {origin}: not valid YAML ({exc}).") from None
    if not isinstance(data, dict) or "name" not in data:
        raise UserInputError(f"strategy {origin}: must be a mapping with at least `name:` and `knobs:`.")
    kwargs: dict[str, Any] = {}
    for key, typ in _FIELDS.items():
        if key in data:
            try:
                kwargs[key] = typ(data[key])
            except (TypeError, ValueError):
                raise UserInputError(f"strategy {origin}: `{key}` got {data[key]!r}, expected {typ.__name__}.") from None
    knobs = data.get("knobs") or {}
    if not isinstance(knobs, dict):
        raise UserInputError(f"strategy {origin}: `knobs` must map knob names to their choices.")
    from .knobs import all_knobs

    task = kwargs.get("task", "inference")
    if task == "training":
        from .training import config as _registers_training_knobs  # noqa: F401
    elif task != "inference":
        raise UserInputError(f"strategy {origin}: `task` got {task!r}; use inference or training.")
    known = {k.name for k in all_knobs(task)}
    for k, v in knobs.items():
        if k not in known:
            raise UserInputError(f"strategy {origin}: unknown knob {k!r}; known: {', '.join(sorted(known))}.")
        if not isinstance(v, dict):
            raise UserInputError(f"strategy {origin}: knob {k!r} must map parameters to lists of choices.")
        for param, choices in v.items():
            if not isinstance(choices, list) and choices != "auto":
                v[param] = [choices]
    extra = {k: v for k, v in data.items() if k not in _FIELDS and k not in ("knobs", "enqueue")}
    return Strategy(knobs=knobs, enqueue=list(data.get("enqueue") or []), extra=extra, **kwargs)
