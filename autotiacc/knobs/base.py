"""The knob plug-in interface, the state a candidate is built in, and plan (de)serialisation.

A knob is one family of optimizations (execution backend, precision, layout, runtime). Each
has a config dataclass (typed defaults, a `version`, validation with the fix in the message)
and a `Knob` that says where it applies, how Optuna samples it, and how it is applied.
Configs round-trip through JSON as {"_type", "_version", "_data"}; `_type` is resolved only
from the registry below, never imported by name from a plan file.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import PlanError, UserInputError


@dataclass(frozen=True)
class KnobConfig:
    """Base of every knob config. Subclasses are frozen dataclasses with a class `version`."""

    version: ClassVar[int] = 1


@dataclass
class SearchContext:
    """What a knob may look at to decide whether and how it is searched."""

    device: str = "cpu"
    level: int = 1
    cores: int = 1
    has_conv: bool = False
    onnxruntime: bool = False
    torchao: bool = False  # the optional extra for weight-only int8 is importable
    has_linear: bool = False  # int8 modes lower nn.Linear layers only
    module_names: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class BuildState:
    """A candidate under construction; knobs mutate it in ascending `Knob.order`.

    `input_casts` transform each input tensor per call; `build_contexts` wrap tracing or
    compiling; `call_contexts` wrap every call; the execution knob sets `runner` last.
    """

    model: Any
    example_inputs: tuple
    device: str = "cpu"
    input_casts: list[Callable[[Any], Any]] = field(default_factory=list)
    build_contexts: list[Callable[[], Any]] = field(default_factory=list)
    call_contexts: list[Callable[[], Any]] = field(default_factory=list)
    runner: Callable[..., Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # engine name -> its options knob's config (`autotiacc.engines`: e.g. the `ort` knob's)
    engine_options: dict[str, Any] = field(default_factory=dict)
    # input tuples an engine calibrates int8 scales on (the test data); None: `example_inputs`
    calibration: list[tuple] | None = None
    # what an earlier build of this plan recorded for the engine to replay (int8 scales)
    recorded: dict[str, Any] = field(default_factory=dict)
    # set by a process that builds many candidates of one model (a trial worker): engines may
    # reuse what they built for an earlier candidate with this key and the same graph (exports)
    reuse_key: Any = None

    def cast_inputs(self, inputs: tuple) -> tuple:
        for cast in self.input_casts:
            inputs = tuple(cast(t) for t in inputs)
        return inputs


class Knob(ABC):
    """One optimization family.

    Call order: `applies(ctx)` once per tune, in the tuner's process, decides whether the knob
    is searched; `suggest_given(trial, space, ctx, chosen)` (by default `suggest(trial, space,
    ctx)`) once per trial, in the tuner's process, samples a config with Optuna (ask/tell: the
    trial is then built elsewhere), after the knobs named in `conditional_on`; `apply(state, config)` in
    the process that builds the candidate, knobs in ascending `order`; the execution knob
    (highest order) turns the prepared model into the runner. `default()` is the baseline.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    task: ClassVar[str] = "inference"  # which task searches it: "inference" or "training"
    order: ClassVar[int] = 50
    # choice -> lowest --level at which it may be searched
    choice_levels: ClassVar[dict[str, dict[Any, int]]] = {}
    cuda_only: ClassVar[dict[str, set]] = {}
    # knobs whose configs this one's space depends on: sampled first, passed to `suggest_given`
    conditional_on: ClassVar[tuple[str, ...]] = ()
    changes_graph: ClassVar[bool] = True  # False: settings of a run (threads, session options), not of the model

    def graph_key(self, config: KnobConfig) -> Any:
        """What of `config` changes the model a backend traces or exports (None: nothing): with
        the caller's `BuildState.reuse_key`, what a build may be reused by (`engines.cache`)."""
        return config if self.changes_graph else None

    def applies(self, ctx: SearchContext) -> bool:
        return True

    def default(self) -> KnobConfig:
        return self.config_cls()

    def choices(self, param: str, space: dict[str, list], ctx: SearchContext) -> list:
        """The strategy's choices for `param`, less those above the level or needing CUDA; the
        default is always kept, so the baseline stays part of every search space."""
        default = getattr(self.default(), param)
        wanted = space.get(param, [default])
        levels = self.levels(param, ctx)
        cuda_only = self.cuda_only.get(param, set())
        out = [c for c in wanted if levels.get(c, 0) <= ctx.level and (ctx.cuda or c not in cuda_only)]
        return out if default in out else [default, *out]

    def param(self, field_name: str) -> str:
        """The Optuna parameter of one config field (field names are unique among inference knobs)."""
        return field_name

    def levels(self, param: str, ctx: SearchContext) -> dict[Any, int]:
        """choice -> lowest --level at which it is searched on `ctx`'s device (a knob may
        promote choices that pay on one device only, e.g. autotuned kernels on CUDA)."""
        return self.choice_levels.get(param, {})

    def pick(self, trial, param: str, space: dict[str, list], ctx: SearchContext) -> Any:
        """`trial.suggest_categorical` when there is a choice; the only value otherwise."""
        options = self.choices(param, space, ctx)
        return trial.suggest_categorical(self.param(param), options) if len(options) > 1 else options[0]

    @abstractmethod
    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> KnobConfig:
        ...

    def suggest_given(self, trial, space: dict[str, list], ctx: SearchContext,
                      chosen: dict[str, KnobConfig]) -> KnobConfig:
        """`suggest`, knowing the configs already sampled for this trial (`chosen`, which holds
        every knob named in `conditional_on`): a conditional space overrides this."""
        return self.suggest(trial, space, ctx)

    @abstractmethod
    def apply(self, state: BuildState, config: KnobConfig) -> None:
        ...

    def incompatible(self, configs: dict[str, KnobConfig], ctx: SearchContext) -> str | None:
        """A reason when this knob's config cannot work with the others (trial is skipped)."""
        return None


_REGISTRY: dict[tuple[str, str], Knob] = {}  # (task, name) -> knob
_CONFIGS: dict[str, type] = {}  # inference plans' allowlist
_TASK_CONFIGS: dict[str, dict[str, type]] = {}


def register(knob_cls: type[Knob]) -> type[Knob]:
    """Class decorator: make a knob and its config known to its task and to plan loading."""
    knob = knob_cls()
    _REGISTRY[(knob.task, knob.name)] = knob
    _TASK_CONFIGS.setdefault(knob.task, {})[knob.config_cls.__name__] = knob.config_cls
    if knob.task == "inference":
        _CONFIGS[knob.config_cls.__name__] = knob.config_cls
    return knob_cls


def all_knobs(task: str = "inference") -> list[Knob]:
    return sorted((k for (t, _), k in _REGISTRY.items() if t == task), key=lambda k: k.order)


def task_configs(task: str) -> dict[str, type]:
    """The config classes a plan of `task` may name (its allowlist)."""
    return dict(_TASK_CONFIGS.get(task, {}))


def get_knob(name: str, task: str = "inference") -> Knob:
    try:
        return _REGISTRY[(task, name)]
    except KeyError:
        known = sorted(n for t, n in _REGISTRY if t == task)
        raise UserInputError(f"unknown knob {name!r}; known: {', '.join(known)}.") from None


def knob_for_config(cfg: KnobConfig) -> Knob:
    for knob in _REGISTRY.values():
        if isinstance(cfg, knob.config_cls):
            return knob
    raise PlanError(f"no knob handles config {type(cfg).__name__}")


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


def config_from_dict(d: dict[str, Any], allowed: dict[str, type] | None = None) -> KnobConfig:
    """Rebuild a config from JSON; only classes in `allowed` (default: the registered knob
    configs) are accepted, never a name imported from the file. Every field is checked against
    its annotation before the config is built (`"false"` is not a bool, `1.5` not an int)."""
    allowed = _CONFIGS if allowed is None else allowed
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


def configs_from_params(values: dict[str, dict[str, Any]]) -> dict[str, KnobConfig]:
    """{knob name: {field: value}} -> {knob name: config}; fills defaults for missing knobs."""
    out = {}
    for knob in all_knobs():  # inference knobs
        fields = values.get(knob.name, {})
        out[knob.name] = dataclasses.replace(knob.default(), **fields) if fields else knob.default()
    return out


def describe(configs: dict[str, KnobConfig]) -> str:
    """Short label for a candidate, showing only what differs from the defaults."""
    parts = []
    for name, cfg in configs.items():
        default = get_knob(name).default()
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v != getattr(default, f.name):
                parts.append(f"{f.name}={v}")
    return ", ".join(parts) or "baseline (eager fp32)"
