"""Layout knob: channels_last memory format for models with 2-D convolutions."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BuildState, Knob, KnobConfig, SearchContext, register


@dataclass(frozen=True)
class LayoutConfig(KnobConfig):
    channels_last: bool = False


@register
class LayoutKnob(Knob):
    name = "layout"
    config_cls = LayoutConfig
    order = 30

    def applies(self, ctx: SearchContext) -> bool:
        return ctx.has_conv

    def suggest(self, trial, space, ctx: SearchContext) -> LayoutConfig:
        if not self.applies(ctx):
            return LayoutConfig()
        return LayoutConfig(channels_last=self.pick(trial, "channels_last", space, ctx))

    def apply(self, state: BuildState, config: LayoutConfig) -> None:
        import torch

        if not config.channels_last:
            return
        state.model = state.model.to(memory_format=torch.channels_last)
        state.input_casts.append(
            lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
