"""OpenVINO knob: the options the openvino engine (`autotiacc.engines.openvino`) compiles its model
with, searched only for candidates whose backend is openvino (the default config elsewhere).

- `inference_precision`: OpenVINO's `INFERENCE_PRECISION_HINT`, f32 or bf16 (bf16 offered only on
  a CPU with bf16 units, avx512_bf16 or amx_bf16: OpenVINO would emulate it elsewhere). f32 is the
  default here, not OpenVINO's own (bf16 wherever the CPU has the units): a plan names what it ran.
- `performance_hint`: `PERFORMANCE_HINT`, LATENCY or THROUGHPUT.
- `num_streams`, `num_threads`: `NUM_STREAMS`, `INFERENCE_NUM_THREADS` (0: the hint decides).

int8 is not an option here: it is the precision knob's `int8_static` mode (NNCF, calibrated), run
by OpenVINO's int8 kernels. The config is recorded in the plan and in its artifact entry, and
`apply`, the artifact and `verify` compile with exactly these properties.
"""
from __future__ import annotations

from ..engines.options import OpenVINOConfig, openvino_available
from ..engines.options import OPENVINO_BACKEND as BACKEND
from .base import BuildState, Knob, KnobConfig, SearchContext, register
from .runtime import thread_choices


def has_bf16_units(ctx: SearchContext) -> bool:
    """Whether the CPU flags the tune read (`ctx.extras["cpu_flags"]`) name bf16 units."""
    from ..native_precision import native_types

    return native_types({"device": "cpu", "cpu_flags": ctx.extras.get("cpu_flags", ())}).runs("bf16")


@register
class OpenVINOKnob(Knob):
    name = "openvino"
    config_cls = OpenVINOConfig
    order = 90  # before the execution knob (100), which builds the engine with this config
    conditional_on = ("execution",)
    changes_graph = False  # compile properties: a build's converted model does not depend on them
    choice_levels = {"inference_precision": {"bf16": 1}}  # level 0 changes no precision
    counts = ("num_streams", "num_threads")  # `auto` in a strategy: 0 and 1..cores

    def applies(self, ctx: SearchContext) -> bool:
        return not ctx.cuda and openvino_available()

    def param(self, field_name: str) -> str:
        return f"openvino_{field_name}"  # `num_threads` beside the runtime knob's `threads`

    def choices(self, param, space, ctx):
        if param in self.counts and space.get(param) in (["auto"], "auto"):
            return thread_choices(ctx)
        out = super().choices(param, space, ctx)
        if param == "inference_precision" and not has_bf16_units(ctx):
            out = [p for p in out if p != "bf16"]  # emulated without the units: never faster
        return out

    def suggest(self, trial, space, ctx: SearchContext) -> OpenVINOConfig:
        return self.default()  # sampled only beside backend openvino: see `suggest_given`

    def suggest_given(self, trial, space, ctx: SearchContext, chosen: dict[str, KnobConfig]) -> OpenVINOConfig:
        """A conditional space: no parameter at all unless the backend is openvino, so TPE's model
        of the other backends is not diluted."""
        if getattr(chosen.get("execution"), "backend", None) != BACKEND or not self.applies(ctx):
            return self.default()
        return OpenVINOConfig(**{f: self.pick(trial, f, space, ctx) for f in
                                 ("inference_precision", "performance_hint", "num_streams", "num_threads")})

    def apply(self, state: BuildState, config: OpenVINOConfig) -> None:
        state.engine_options[BACKEND] = config  # read by the engine when the execution knob builds it

    def incompatible(self, configs, ctx):
        if configs["execution"].backend != BACKEND:
            return None
        precision = configs["precision"]
        lowered = precision.groups if precision.mode != "int8_static" else ()  # under int8_static: kept fp32
        if precision.mode not in ("fp32", "int8_static") or lowered:
            return ("the openvino engine runs f32, bf16 (its `inference_precision`) or int8_static; torch's "
                    f"precision mode {precision.mode}{' with per-layer groups' if lowered else ''} "
                    "does not carry into it")
        if getattr(configs.get("layout"), "channels_last", False):
            return "OpenVINO chooses its own memory layouts: channels_last does not carry into it"
        if getattr(configs.get("runtime"), "threads", 0):
            return "OpenVINO runs its own threads: set them with the openvino knob's num_threads, not torch's"
        return None
