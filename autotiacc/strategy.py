"""Declarative search-space presets (YAML) shipped as package data, or a user's own file.

A strategy is checked whole when it loads, before any work starts: unknown keys and knob
parameters (typos) are refused with the nearest valid name, every choice is checked by
building the knob's config with it, and numbers are range-checked. Errors are
`StrategyError`, naming the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import StrategyError, UserInputError

OBJECTIVES = ("latency", "throughput")
# Keys read by other parts (dynamic-shape tuning) and their types; they land in `Strategy.extra`.
EXTRA_KEYS: dict[str, Any] = {"batch_sizes": list[int], "max_buckets": int, "traffic_rounds": int,
                              "final_traffic_rounds": int}
# Strategy parameters that are not config fields: the modes offered per precision group.
EXTRA_PARAMS = {"precision": ("group_modes",)}
AUTO_PARAMS = {("runtime", "threads"), ("ort", "inter_threads"), ("data", "num_workers"),  # may be `auto`, not a list
               ("openvino", "num_streams"), ("openvino", "num_threads")}
TASKS = ("inference", "training")


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
    # stage-1 starting points on CUDA (what pays on GPUs); `enqueue` is used where this is empty
    enqueue_cuda: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def space(self, knob: str) -> dict[str, Any]:
        return self.knobs.get(knob, {})

    def seeds(self, *, cuda: bool) -> list[dict[str, dict[str, Any]]]:
        """The stage-1 starting points for the device: `enqueue_cuda` on CUDA when given."""
        return list(self.enqueue_cuda) if cuda and self.enqueue_cuda else list(self.enqueue)


# (check, what the value must be) per numeric field; a field not listed needs only its type.
_RANGES = {
    "trial_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "measure_s": (lambda v: v > 0, "a positive number of seconds"),
    "final_measure_s": (lambda v: v > 0, "a positive number of seconds"),
    "final_top_k": (lambda v: v >= 1, "a whole number >= 1"),
    "patience": (lambda v: v >= 1, "a whole number >= 1 (trials without a new best before stopping)"),
    "prune_factor": (lambda v: v >= 1, "a number >= 1 (prune candidates this many times slower than the best)"),
    "max_trial_share": (lambda v: 0 < v <= 1, "a fraction of the budget in (0, 1]"),
    "profile_share": (lambda v: 0 < v <= 1, "a fraction of the budget in (0, 1]"),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    "objective": (lambda v: v in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
    "name": (lambda v: bool(v.strip()), "a non-empty name"),
    "batch_sizes": (lambda v: bool(v) and all(b >= 1 for b in v), "a list of positive batch sizes"),
    "max_buckets": (lambda v: v >= 1, "a whole number >= 1"),
    "traffic_rounds": (lambda v: v >= 1, "a whole number >= 1"),
    "final_traffic_rounds": (lambda v: v >= 1, "a whole number >= 1"),
}


def builtin_strategies() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("autotiacc.strategies").iterdir() if p.name.endswith(".yaml"))


def _refuse(origin: str, what: str, value: Any, options: typing.Iterable[str]) -> StrategyError:
    options = sorted(options)
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(options)}."
    return StrategyError(f"strategy {origin}: unknown {what} {_show(value)}; {hint}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _read(name_or_path: str) -> tuple[str, str]:
    p = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or p.exists():
        if not p.is_file():
            raise StrategyError(f"`--strategy` file {name_or_path!r} " + ("is not a file." if p.exists() else
                                                                          "does not exist."))
        try:
            return p.read_text(encoding="utf-8"), str(p)
        except (OSError, UnicodeDecodeError) as exc:
            raise StrategyError(f"strategy {p}: cannot be read ({exc}).") from None
    res = resources.files("autotiacc.strategies") / f"{name_or_path}.yaml"
    if not res.is_file():
        raise StrategyError(f"`--strategy` got {name_or_path!r}: use one of {', '.join(builtin_strategies())} "
                            "or a path to a .yaml file.")
    return res.read_text(encoding="utf-8"), name_or_path


def load_strategy(name_or_path: str) -> Strategy:
    """A built-in preset by name, or a YAML file path; anything wrong is a `StrategyError`."""
    text, origin = _read(name_or_path)
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C parser when built
    except yaml.YAMLError as exc:
        raise StrategyError(f"strategy {origin}: not valid YAML ({' '.join(str(exc).split())[:200]}).") from None
    except RecursionError:
        raise StrategyError(f"strategy {origin}: nested too deeply to be a strategy.") from None
    if not isinstance(data, dict) or "name" not in data:
        raise StrategyError(f"strategy {origin}: must be a mapping with at least `name:` and `knobs:`.")
    return strategy_from_dict(data, origin)


def strategy_from_dict(data: dict[str, Any], origin: str) -> Strategy:
    """Check a parsed strategy whole (see the module doc) and build it."""
    from .config_io import matches_type, type_name

    hints = typing.get_type_hints(Strategy)
    seed_keys = ("enqueue", "enqueue_cuda")  # stage-1 starting points; enqueue_cuda replaces enqueue on CUDA
    scalars = {f.name: hints[f.name] for f in dataclasses.fields(Strategy)
               if f.name not in ("knobs", "extra", *seed_keys)}
    known = {**scalars, **EXTRA_KEYS}
    for key in data:
        if key not in known and key not in ("knobs", *seed_keys):
            raise _refuse(origin, "key", key, [*known, "knobs", *seed_keys])
    for key, hint in known.items():
        if key not in data:
            continue
        value = data[key]
        if not matches_type(value, hint):
            raise StrategyError(f"strategy {origin}: `{key}` got {_show(value)}, expected {type_name(hint)}.")
        check, want = _RANGES.get(key, (lambda v: True, ""))
        if not check(value):
            raise StrategyError(f"strategy {origin}: `{key}` got {value!r}: use {want}.")
    task = data.get("task", "inference")
    _require_task_knobs(task, origin)
    knobs = _check_knobs(data.get("knobs") or {}, origin, task)
    seeds = {}
    for key in seed_keys:
        seeds[key] = data.get(key) or []
        if not isinstance(seeds[key], list):
            raise StrategyError(f"strategy {origin}: `{key}` must be a list of starting points, e.g. "
                                "[{execution: {backend: torchscript}}].")
        for i, entry in enumerate(seeds[key]):
            _check_entry(entry, origin, f"{key} entry {i + 1}", task)
    kwargs = {k: (float(v) if hints[k] is float else v) for k, v in data.items() if k in scalars}
    extra = {k: v for k, v in data.items() if k in EXTRA_KEYS}
    return Strategy(knobs=knobs, enqueue=list(seeds["enqueue"]), enqueue_cuda=list(seeds["enqueue_cuda"]),
                    extra=extra, **kwargs)


def _require_task_knobs(task: str, origin: str) -> None:
    """A task's knobs are registered by the package that defines the task (the training knobs by
    `autotiacc.training`, which tunes with them); this module never imports a task above it."""
    from .knobs import all_knobs

    if not all_knobs(task):
        raise StrategyError(f"strategy {origin}: no knobs of task {task!r} are registered in this process; "
                            f"load a {task} strategy through autotiacc.{task} (e.g. `autotiacc tune --mode train`), "
                            f"which registers them.")


def _knob(name: Any, origin: str, task: str):
    from .knobs import all_knobs

    knobs = {k.name: k for k in all_knobs(task)}
    if name not in knobs:
        raise _refuse(origin, "knob", name, knobs)
    return knobs[name]


def _check_value(knob, param: str, value: Any, origin: str, where: str) -> None:
    """Build the knob's config with this one value: the config's own checks decide."""
    from .config_io import field_type_errors

    wrong = field_type_errors(knob.config_cls, {param: value})
    if wrong:
        raise StrategyError(f"strategy {origin}: {where}: {wrong[0]}.")
    try:
        knob.config_cls(**{param: value})
    except (TypeError, ValueError, UserInputError) as exc:
        raise StrategyError(f"strategy {origin}: {where}: {exc}") from None


def _params(knob) -> list[str]:
    return [f.name for f in dataclasses.fields(knob.config_cls)] + list(EXTRA_PARAMS.get(knob.name, ()))


def _check_knobs(knobs: Any, origin: str, task: str) -> dict[str, dict[str, Any]]:
    if not isinstance(knobs, dict):
        raise StrategyError(f"strategy {origin}: `knobs` must map knob names to their choices.")
    out: dict[str, dict[str, Any]] = {}
    for name, space in knobs.items():
        knob = _knob(name, origin, task)
        if space is None:
            space = {}
        if not isinstance(space, dict):
            raise StrategyError(f"strategy {origin}: knob `{name}` must map parameters to lists of choices.")
        out[name] = {}
        for param, choices in space.items():
            if param not in _params(knob):
                raise _refuse(origin, f"parameter of knob `{name}`", param, _params(knob))
            if choices == "auto" and (name, param) in AUTO_PARAMS:
                out[name][param] = choices
                continue
            choices = choices if isinstance(choices, list) else [choices]
            if not choices:
                raise StrategyError(f"strategy {origin}: `{name}.{param}` lists no choice; give at least one.")
            for c in choices:
                if param == "group_modes":
                    from .knobs.precision_groups import LOWERED_MODES

                    if c not in LOWERED_MODES:
                        raise StrategyError(f"strategy {origin}: `{name}.group_modes` got {_show(c)}: use "
                                            f"any of {', '.join(LOWERED_MODES)}.")
                else:
                    _check_value(knob, param, c, origin, f"`{name}.{param}` choice {_show(c)}")
            out[name][param] = choices
    return out


def _check_entry(entry: Any, origin: str, where: str, task: str) -> None:
    if not isinstance(entry, dict):
        raise StrategyError(f"strategy {origin}: {where} must map knob names to their values, e.g. "
                            "{execution: {backend: torchscript}}.")
    for name, values in entry.items():
        knob = _knob(name, origin, task)
        if not isinstance(values, dict):
            raise StrategyError(f"strategy {origin}: {where}: knob `{name}` must map parameters to one value each.")
        for param, value in values.items():
            if param not in _params(knob) or param in EXTRA_PARAMS.get(name, ()):
                raise _refuse(origin, f"parameter of knob `{name}` in {where}", param,
                              [f.name for f in dataclasses.fields(knob.config_cls)])
            _check_value(knob, param, value, origin, f"{where}: `{name}.{param}`")
