"""ONNX Runtime's own session options as a knob (`ort`): searched only for candidates whose
backend is onnxruntime, recorded in the plan, and used by every session built from it (the
trial's, `plan.apply`'s, the artifact's in `load_artifact`, `verify`'s), exactly as measured.

Intra-op threads are the runtime knob's `threads` (one parameter for every backend: 0 leaves
ORT's default, one thread per physical core). This knob adds what only ORT has: inter-op
threads (parallel execution mode), the graph optimization level, the execution mode, the
memory pattern, the CPU arena, and whether idle pool threads spin.

How each option is judged, and why: the search times a candidate interleaved with the eager
baseline in ONE warm worker process. Every option but spinning is judged fairly there, since
it changes only what ORT does while its `run` executes. Spinning changes what happens *after*
`run` returns: ORT's idle threads keep spinning and take the cores from the torch baseline
timed next (DESIGN.md: a compiled convnet ran 90 ms beside spinning threads, 48 ms without),
and torch's OpenMP threads spin against ORT's in turn. So the search always measures with
spinning off, and `spinning` is never an Optuna parameter: where the strategy lists `true`,
the final re-measurement, which times each variant alone in its own fresh process, adds a
spinning twin of each ONNX Runtime finalist (`spinning_twins`) and the plan keeps spinning
only if the twin's windows beat its finalist's beyond noise.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from ..engines.options import OrtConfig
from ..engines.options import ORT_BACKEND as BACKEND
from .base import BuildState, Knob, KnobConfig, SearchContext, register
from .runtime import thread_choices


@register
class OrtKnob(Knob):
    name = "ort"
    config_cls = OrtConfig
    order = 90  # before the execution knob (100), which builds the session
    conditional_on = ("execution",)
    changes_graph = False
    # lowering the optimization level or dropping the arena rarely pays: level 2 only
    choice_levels = {"graph_optimization": {"basic": 2, "disabled": 2}, "memory_pattern": {False: 2},
                     "cpu_arena": {False: 2}}

    def param(self, field_name: str) -> str:
        return f"ort_{field_name}"  # `threads`-like names stay apart from the runtime knob's

    def applies(self, ctx: SearchContext) -> bool:
        return ctx.onnxruntime

    def choices(self, param, space, ctx):
        if param == "inter_threads" and space.get(param) in (["auto"], "auto"):
            return thread_choices(ctx)
        return super().choices(param, space, ctx)

    def suggest(self, trial, space, ctx: SearchContext) -> OrtConfig:
        return self.default()  # sampled only beside backend onnxruntime: see `suggest_given`

    def suggest_given(self, trial, space, ctx: SearchContext, chosen: dict[str, KnobConfig]) -> OrtConfig:
        """A conditional space: no parameter at all unless the backend is onnxruntime, so TPE's
        model of the other backends is not diluted; spinning is not sampled (see the module doc)."""
        if getattr(chosen.get("execution"), "backend", None) != BACKEND or not self.applies(ctx):
            return self.default()
        mode = self.pick(trial, "execution_mode", space, ctx)
        return OrtConfig(inter_threads=self.pick(trial, "inter_threads", space, ctx) if mode == "parallel" else 0,
                         graph_optimization=self.pick(trial, "graph_optimization", space, ctx), execution_mode=mode,
                         memory_pattern=self.pick(trial, "memory_pattern", space, ctx),
                         cpu_arena=self.pick(trial, "cpu_arena", space, ctx))

    def apply(self, state: BuildState, config: OrtConfig) -> None:
        state.engine_options[BACKEND] = config


def spinning_twin(values: dict[str, Any], space: dict[str, Any]) -> dict[str, Any] | None:
    """Trial `values` with ONNX Runtime's pool threads spinning, for the final to time alone in
    its own process; None when the candidate is not onnxruntime (one shape), already spins, or
    the strategy does not list `spinning: true` for the `ort` knob."""
    if (values.get("execution", {}).get("backend") != BACKEND or True not in (space.get("spinning") or [])
            or values.get("shapes")):  # a traffic plan's buckets carry their own knobs
        return None
    cfg = OrtConfig(**values.get("ort", {}))
    if cfg.spinning:
        return None
    return {**values, "ort": asdict(replace(cfg, spinning=True))}
