"""Runtime knob: intra-op thread count, inference_mode, cudnn.benchmark (CUDA)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..config_io import MAX_THREADS
from ..device import process_flags
from .base import BuildState, Knob, KnobConfig, SearchContext, register


@dataclass(frozen=True)
class RuntimeConfig(KnobConfig):
    threads: int = 0  # 0 = leave torch's default
    inference_mode: bool = True
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"`threads` got {self.threads}: use 0 (default) or a positive count up to {MAX_THREADS}.")


def thread_choices(ctx: SearchContext) -> list[int]:
    """A strategy's `auto` thread counts: 0 (the library's default), then 1 to the usable cores."""
    return [0] + list(range(1, ctx.cores + 1)) if ctx.cores > 1 else [0]


@contextlib.contextmanager
def thread_scope(n: int):
    """Set torch's intra-op threads for one call and restore them, so interleaved candidates
    with different thread counts are each timed with their own."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            torch.set_num_threads(before)


@register
class RuntimeKnob(Knob):
    name = "runtime"
    config_cls = RuntimeConfig
    order = 10
    changes_graph = False
    cuda_only = {"cudnn_benchmark": {True}}

    def choices(self, param, space, ctx):
        if param == "threads" and space.get("threads") in (["auto"], "auto"):
            return thread_choices(ctx)
        return super().choices(param, space, ctx)

    def suggest(self, trial, space, ctx: SearchContext) -> RuntimeConfig:
        return RuntimeConfig(threads=self.pick(trial, "threads", space, ctx),
                             inference_mode=self.pick(trial, "inference_mode", space, ctx),
                             cudnn_benchmark=self.pick(trial, "cudnn_benchmark", space, ctx))

    def apply(self, state: BuildState, config: RuntimeConfig) -> None:
        import torch

        state.notes["threads"] = config.threads
        if config.threads:
            state.build_contexts.append(lambda: thread_scope(config.threads))
            state.call_contexts.append(lambda: thread_scope(config.threads))
        if config.inference_mode:
            state.call_contexts.append(torch.inference_mode)
        else:
            state.call_contexts.append(torch.no_grad)
        if config.cudnn_benchmark:  # scoped like TF32 (see the precision knob): never left on for others
            bench = lambda: process_flags(cudnn_benchmark=True)  # noqa: E731
            state.build_contexts.append(bench)
            state.call_contexts.append(bench)
