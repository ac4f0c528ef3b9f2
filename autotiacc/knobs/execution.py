"""Execution knob: eager, TorchScript (trace + freeze + optimize_for_inference), torch.compile
(modes, Inductor freezing), ONNX Runtime (optional; the user still calls a PyTorch callable),
and on CUDA a captured CUDA graph around the eager or TorchScript runner (`cuda_graphs`).

This knob runs last: it turns the model prepared by the other knobs into `state.runner`.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from .base import BuildState, Knob, KnobConfig, SearchContext, register

BACKENDS = ("eager", "torchscript", "compile", "onnxruntime")
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
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` got {self.backend!r}: use one of {', '.join(BACKENDS)}.")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"`compile_mode` got {self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}.")
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
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(config.compile_mode))
    if config.freezing:
        options["freezing"] = True
    return options


def _torchscript(state: BuildState):
    import torch

    inputs = state.cast_inputs(state.example_inputs)
    with torch.no_grad(), _stack(state.build_contexts):
        traced = torch.jit.trace(state.model, inputs, check_trace=False)
        frozen = torch.jit.freeze(traced)
        return torch.jit.optimize_for_inference(frozen)


def _onnxruntime(state: BuildState, threads: int):
    import numpy as np
    import torch
    import torch.utils._pytree as pytree

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("backend=onnxruntime needs `pip install onnxruntime` (extra: autotiacc[onnx]).") from exc
    inputs = state.cast_inputs(state.example_inputs)
    with torch.no_grad():
        ref = state.model(*inputs)
    _, out_spec = pytree.tree_flatten(ref)
    buf = io.BytesIO()
    names = [f"input_{i}" for i in range(len(inputs))]
    # nn.TransformerEncoder's fused fast path (`_transformer_encoder_layer_fwd`) has no ONNX
    # export: trace the equivalent composite ops instead; the session fuses them itself.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(state.model, inputs, buf, dynamo=False, input_names=names,
                              opset_version=17, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads slowed interleaved torch candidates 2x here; turn it off.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    providers = (["CUDAExecutionProvider"] if state.device.startswith("cuda") else []) + ["CPUExecutionProvider"]
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=providers)
    dev = torch.device(state.device)

    def run(*args):
        feed = {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(names, args)}
        outs = [torch.from_numpy(o).to(dev) for o in sess.run(None, feed)]
        return pytree.tree_unflatten(outs, out_spec)

    run.onnx_bytes = len(buf.getvalue())
    return run


@register
class ExecutionKnob(Knob):
    name = "execution"
    config_cls = ExecutionConfig
    order = 100
    choice_levels = {"compile_mode": {"max-autotune": 2, "max-autotune-no-cudagraphs": 2}}
    # on CUDA autotuned Inductor kernels are a level-1 choice (they pay there); max-autotune,
    # which adds CUDA graphs on top, stays at level 2
    cuda_levels = {"compile_mode": {"max-autotune": 2, "max-autotune-no-cudagraphs": 1}}
    cuda_only = {"compile_mode": {"reduce-overhead", "max-autotune"}, "cuda_graphs": {True}}

    def levels(self, param, ctx):
        return self.cuda_levels.get(param, {}) if ctx.cuda else super().levels(param, ctx)

    def choices(self, param, space, ctx):
        out = super().choices(param, space, ctx)
        if param == "backend" and not ctx.onnxruntime:
            out = [b for b in out if b != "onnxruntime"] or ["eager"]
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
        elif config.backend == "onnxruntime":
            threads = state.notes.get("threads", 0)
            state.runner = _onnxruntime(state, threads)
        if config.cuda_graphs:  # captured on the first call, inside the call contexts
            from .cuda_graphs import CUDAGraphRunner

            state.runner = CUDAGraphRunner(state.runner, state.device)
