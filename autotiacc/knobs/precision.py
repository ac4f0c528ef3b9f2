"""Precision knob: fp32, TF32 (CUDA), bf16/fp16 autocast, bf16/fp16 weight casts, and
per-layer precision: `groups` lowers chosen submodules only (see autotiacc.knobs.precision_groups).

Outputs keep the model's original dtype: the candidate wrapper casts floating outputs back.
Nothing here is assumed fast: bf16 autocast ran ~30x slower than fp32 on one AVX2-only EPYC
and ~4x faster on a Xeon with a bf16 path. The tuner measures.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..device import process_flags
from .base import BuildState, Knob, KnobConfig, SearchContext, register
from .precision_groups import GROUP_MODES, apply_group_precision, param_name

MODES = ("fp32", "tf32", "bf16_autocast", "fp16_autocast", "bf16_weights", "fp16_weights")


@dataclass(frozen=True)
class PrecisionConfig(KnobConfig):
    mode: str = "fp32"
    # ((module path, group mode), ...): per-layer precision under a fp32/tf32 global mode
    groups: tuple = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`mode` got {self.mode!r}: use one of {', '.join(MODES)}.")
        # JSON gives lists; keep tuples so configs compare, hash and round-trip exactly
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            if len(g) != 2 or not isinstance(g[0], str) or g[1] not in GROUP_MODES:
                raise ValueError(f"`groups` entry {list(g)!r}: use [module path, mode] with mode one of "
                                 f"{', '.join(GROUP_MODES)}.")
        if groups and self.mode not in ("fp32", "tf32"):
            raise ValueError(f"`groups` needs `mode` fp32 or tf32 (got {self.mode!r}): per-layer precision "
                             "lowers layers of a full-precision model.")
        object.__setattr__(self, "groups", groups)

    @property
    def dtype_name(self) -> str | None:
        return self.mode.split("_")[0] if self.mode.endswith(("_autocast", "_weights")) else None


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


@register
class PrecisionKnob(Knob):
    name = "precision"
    config_cls = PrecisionConfig
    order = 20
    # level 0 changes no precision; level 1 allows reduced precision
    choice_levels = {"mode": {m: (0 if m == "fp32" else 1) for m in MODES}}
    cuda_only = {"mode": {"tf32"}}

    def suggest(self, trial, space, ctx: SearchContext) -> PrecisionConfig:
        mode = self.pick(trial, "mode", space, ctx)
        layers = ctx.extras.get("precision_groups") or []
        if mode not in ("fp32", "tf32") or ctx.level < 1 or not layers:
            return PrecisionConfig(mode=mode)
        # conditional parameters: one per group, sampled only under a full-precision global mode
        groups = tuple((g["path"], trial.suggest_categorical(param_name(g["path"]), g["choices"])) for g in layers)
        return PrecisionConfig(mode=mode, groups=groups if any(m != "fp32" for _, m in groups) else ())

    def apply(self, state: BuildState, config: PrecisionConfig) -> None:
        import torch

        if config.groups:
            apply_group_precision(state.model, config.groups, state.device)
        if config.mode == "tf32":
            # per candidate, not process-wide: set while it builds and runs, restored after, so
            # neither the baseline timed beside it nor the user's process inherits TF32
            tf32 = lambda: process_flags(cuda_matmul_tf32=True, cudnn_tf32=True)  # noqa: E731
            state.build_contexts.append(tf32)
            state.call_contexts.append(tf32)
            return
        name = config.dtype_name
        if name is None:
            return
        dtype = _dtype(name)
        if config.mode.endswith("_autocast"):
            device_type = "cuda" if state.device.startswith("cuda") else "cpu"
            ctx = lambda: torch.autocast(device_type=device_type, dtype=dtype)  # noqa: E731
            state.build_contexts.append(ctx)
            state.call_contexts.append(ctx)
        else:
            state.model = state.model.to(dtype)
            state.input_casts.append(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def incompatible(self, configs, ctx):
        cfg = configs["precision"]
        if cfg.mode.endswith("_autocast") and configs["execution"].backend == "onnxruntime":
            return "autocast does not carry into an ONNX Runtime session"
        if any(m.endswith("_autocast") for _, m in cfg.groups) and configs["execution"].backend == "onnxruntime":
            return "per-layer autocast regions do not carry into an ONNX Runtime session"
        return None
