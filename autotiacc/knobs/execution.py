"""Execution knob: eager, TorchScript (trace + freeze + optimize_for_inference), torch.compile
(modes, Inductor freezing), an engine outside PyTorch (`autotiacc.engines`: ONNX Runtime, OpenVINO;
the user still calls a PyTorch callable), and on CUDA a captured CUDA graph around the eager or TorchScript
runner (`cuda_graphs`).

This knob runs last: it turns the model prepared by the other knobs into `state.runner`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..config_io import check_choice
from .base import BuildState, Knob, KnobConfig, SearchContext, register

TORCH_BACKENDS = ("eager", "torchscript", "compile")
BACKENDS = (*TORCH_BACKENDS, "onnxruntime", "openvino")  # the rest are `autotiacc.engines`
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_BACKENDS = ("eager", "torchscript")


@dataclass(frozen=True)
class ExecutionConfig(KnobConfig):
    backend: str = "eager"
    compile_mode: str = "default"
    freezing: bool = False
    dynamic: bool | None = None  # torch.compile(dynamic=...): None = automatic
    # CUDA only: replay the eager/TorchScript runner as a captured CUDA graph (static shapes).
    # torch.compile has its own (compile_mode reduce-overhead); the default keeps old plans valid.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if self.cuda_graphs and self.backend not in GRAPHED_BACKENDS:
            raise ValueError(f"`cuda_graphs` wraps backend eager or torchscript, got backend {self.backend!r}: "
                             "for torch.compile use compile_mode reduce-overhead instead.")


def _stack(factories):
    stack = contextlib.ExitStack()
    for make in factories:
        stack.enter_context(make())
    return stack


def compile_options(config: ExecutionConfig) -> dict:
    """torch.compile takes `mode` or `options`, not both: expand the mode into its options."""
    from ..torch_compat import inductor_mode_options

    options = inductor_mode_options(config.compile_mode)
    if config.freezing:
        options["freezing"] = True
    return options


def _torchscript(state: BuildState):
    """The traced, frozen, inference-optimized module; a worker reuses it across candidates that
    differ only in run settings (threads, inference_mode: `engines.cache`, keyed by the graph)."""
    from ..engines.cache import BUILDS

    key = None if state.reuse_key is None else (
        "torchscript", state.reuse_key, [(tuple(t.shape), str(t.dtype)) for t in state.example_inputs])
    return BUILDS.obj(key, lambda: _trace(state))


def _trace(state: BuildState):
    import torch

    inputs = state.cast_inputs(state.example_inputs)
    with torch.no_grad(), _stack(state.build_contexts):
        traced = torch.jit.trace(state.model, inputs, check_trace=False)
        frozen = torch.jit.freeze(traced)
        return torch.jit.optimize_for_inference(frozen)


@register
class ExecutionKnob(Knob):
    name = "execution"
    config_cls = ExecutionConfig
    order = 100
    changes_graph = False
    choice_levels = {"compile_mode": {"max-autotune": 2, "max-autotune-no-cudagraphs": 2}}
    # on CUDA autotuned Inductor kernels are a level-1 choice (they pay there); max-autotune,
    # which adds CUDA graphs on top, stays at level 2
    cuda_levels = {"compile_mode": {"max-autotune": 2, "max-autotune-no-cudagraphs": 1}}
    cuda_only = {"compile_mode": {"reduce-overhead", "max-autotune"}, "cuda_graphs": {True}}

    def levels(self, param, ctx):
        return self.cuda_levels.get(param, {}) if ctx.cuda else super().levels(param, ctx)

    def choices(self, param, space, ctx):
        out = super().choices(param, space, ctx)
        if param == "backend":
            from ..engines import engine

            # an engine is searched only where its package imports (ctx.onnxruntime: read once per tune)
            # and on the devices it runs on
            device = "cuda" if ctx.cuda else "cpu"
            out = [b for b in out if b in TORCH_BACKENDS or (b == "onnxruntime" and ctx.onnxruntime)
                   or (b != "onnxruntime" and (e := engine(b)) is not None and e.available()
                       and device in e.devices)] or ["eager"]
        return out

    def suggest(self, trial, space, ctx: SearchContext) -> ExecutionConfig:
        backend = self.pick(trial, "backend", space, ctx)
        if backend in GRAPHED_BACKENDS:
            return ExecutionConfig(backend=backend, cuda_graphs=self.pick(trial, "cuda_graphs", space, ctx))
        if backend != "compile":
            return ExecutionConfig(backend=backend)
        return ExecutionConfig(backend=backend, compile_mode=self.pick(trial, "compile_mode", space, ctx),
                               freezing=self.pick(trial, "freezing", space, ctx))

    def apply(self, state: BuildState, config: ExecutionConfig) -> None:
        import torch

        if config.backend == "eager":
            state.runner = state.model
        elif config.backend == "torchscript":
            state.runner = _torchscript(state)
        elif config.backend == "compile":
            state.runner = torch.compile(state.model, options=compile_options(config), dynamic=config.dynamic)
        else:
            from ..engines import engine

            state.runner = engine(config.backend).build(state, config)
        if config.cuda_graphs:  # captured on the first call, inside the call contexts
            from .cuda_graphs import CUDAGraphRunner

            state.runner = CUDAGraphRunner(state.runner, state.device)
