"""A task's search space from registered knobs and a YAML strategy: sampling one candidate
with Optuna, and turning the strategy's stage-1 entries into Optuna params."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import UserInputError
from ..knobs.base import Knob, KnobConfig, SearchContext

_STRATEGY_HINT = {"inference": "inference-latency, inference-throughput or quick (or a YAML file without `task:`)",
                  "training": "training (or a YAML file with `task: training`) with --mode train"}


def strategy_for(task: str, name_or_path: str):
    """The strategy `name_or_path`, which must be written for `task`."""
    from ..strategy import load_strategy

    strategy = load_strategy(name_or_path)
    if strategy.task != task:
        raise UserInputError(f"`--strategy` {name_or_path!r} is a {strategy.task} strategy; this is a {task} tune: "
                             f"use {_STRATEGY_HINT[task]}.")
    return strategy


def sample(trial, knobs: list[Knob], strategy, ctx: SearchContext) -> dict[str, KnobConfig]:
    """{knob name: config} for one trial, each knob sampling its strategy's choices; a knob with
    a conditional space (`Knob.conditional_on`) after the others, knowing their configs."""
    chosen: dict[str, KnobConfig] = {}
    for k in sorted(knobs, key=lambda k: bool(k.conditional_on)):
        chosen[k.name] = k.suggest_given(trial, strategy.space(k.name), ctx, chosen)
    return {k.name: chosen[k.name] for k in knobs}


def as_values(configs: dict[str, KnobConfig]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}


def config_key(values: dict[str, Any]) -> str:
    """One string per configuration: duplicates have the same key."""
    return json.dumps({k: v for k, v in sorted(values.items())}, sort_keys=True, default=str)


def seed_allowed(entry: dict[str, dict], knobs: list[Knob], strategy, ctx: SearchContext) -> bool:
    """A stage-1 entry is used only if every value it names is searchable here (level, device,
    cores, processes)."""
    by_name = {k.name: k for k in knobs}
    for knob_name, fields in entry.items():
        knob = by_name.get(knob_name)
        if knob is None:
            return False
        for param, value in fields.items():
            if value not in knob.choices(param, strategy.space(knob_name), ctx):
                return False
    return True


def seed_params(entry: dict[str, dict], knobs: list[Knob]) -> dict[str, Any]:
    """Stage-1 entries are nested by knob and list only what differs from the baseline; Optuna
    params are flat and must pin every default too."""
    params: dict[str, Any] = {}
    for knob in knobs:
        fields = {**dataclasses.asdict(knob.default()), **entry.get(knob.name, {})}
        params.update({knob.param(f): v for f, v in fields.items() if v is not None and not isinstance(v, (tuple, list))})
    return params


def seeds(strategy, knobs: list[Knob], ctx: SearchContext, *, entries: list[dict] | None = None,
          extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Optuna params of the stage-1 entries (default: the strategy's for this device) usable
    here, in order (the baseline first)."""
    entries = strategy.seeds(cuda=ctx.cuda) if entries is None else entries
    return [{**(extra or {}), **seed_params(entry, knobs)} for entry in entries
            if seed_allowed(entry, knobs, strategy, ctx)]
