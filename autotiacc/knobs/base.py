"""The knob plug-in interface and registry (the state a candidate is built in, `BuildState`, is
the engines'; configs' JSON form is `autotiacc.config_io`'s).

A knob is one family of optimizations (execution backend, precision, layout, runtime). Each
has a config dataclass (typed defaults, a `version`, validation with the fix in the message)
and a `Knob` that says where it applies, how Optuna samples it, and how it is applied.
A plan's knob configs are read back only as the classes registered below, never by a name
imported from the file.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import config_io
from ..config_io import KnobConfig, config_to_dict  # noqa: F401 (the knobs' API: `autotiacc.knobs` exports them)
from ..engines.base import BuildState
from ..errors import PlanError, UserInputError


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


def config_from_dict(d: dict[str, Any], allowed: dict[str, type] | None = None) -> KnobConfig:
    """`config_io.config_from_dict`, allowing the registered inference knob configs by default."""
    return config_io.config_from_dict(d, _CONFIGS if allowed is None else allowed)


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
