"""Precision knob: fp32, TF32 (CUDA), bf16/fp16 autocast, bf16/fp16 weight casts, int8 weights
of `nn.Linear` layers (`int8_dynamic` on CPU, weight-only `int8_weights` with torchao: see
autotiacc.knobs.int8), calibrated static int8 by an engine's own quantizer (`int8_static`:
weights and activations, scales calibrated on the test data; ONNX Runtime's, see
autotiacc.engines.ort_int8, or OpenVINO's through NNCF, see autotiacc.engines.openvino), and
per-layer precision: `groups` lowers chosen submodules only (see autotiacc.knobs.precision_groups),
or under `int8_static` names those kept in fp32.

Outputs keep the model's original dtype: the candidate wrapper casts floating outputs back.
Nothing here is assumed fast: bf16 autocast ran ~30x slower than fp32 on one AVX2-only EPYC
and ~4x faster on a Xeon with a bf16 path. The tuner measures.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config_io import check_choice
from ..device import process_flags
from .base import BuildState, Knob, KnobConfig, SearchContext, register
from .int8 import quantize_int8_dynamic, quantize_int8_weights
from .precision_groups import GROUP_MODES, apply_group_precision, param_name

# New modes go at the end: Optuna's categorical choices keep their order.
MODES = ("fp32", "tf32", "bf16_autocast", "fp16_autocast", "bf16_weights", "fp16_weights", "int8_dynamic",
         "int8_weights", "int8_static")
STATIC_INT8 = "int8_static"  # built by an engine with a static quantizer (`Engine.static_int8`)
INT8_MODES = ("int8_dynamic", "int8_weights")


@dataclass(frozen=True)
class PrecisionConfig(KnobConfig):
    mode: str = "fp32"
    # ((module path, group mode), ...): per-layer precision under a fp32/tf32 global mode; under
    # int8_static, the groups kept in fp32 ((path, "fp32"), ...), the rest quantized
    groups: tuple = ()

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        # JSON gives lists; keep tuples so configs compare, hash and round-trip exactly
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            if len(g) != 2 or not isinstance(g[0], str) or g[1] not in GROUP_MODES:
                raise ValueError(f"`groups` entry {list(g)!r}: use [module path, mode] with mode one of "
                                 f"{', '.join(GROUP_MODES)}.")
        if self.mode == STATIC_INT8 and any(m != "fp32" for _, m in groups):
            raise ValueError("under `mode` int8_static, `groups` lists the layers kept in fp32: use [module path, "
                             "fp32] entries only.")
        if groups and self.mode not in ("fp32", "tf32", STATIC_INT8):
            raise ValueError(f"`groups` needs `mode` fp32 or tf32 (got {self.mode!r}): per-layer precision "
                             "lowers layers of a full-precision model.")
        object.__setattr__(self, "groups", groups)

    @property
    def dtype_name(self) -> str | None:
        """bf16 or fp16 for the autocast and weight-cast modes; None otherwise (int8 included)."""
        name = self.mode.split("_")[0]
        return name if name in ("bf16", "fp16") else None


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

    def choices(self, param, space, ctx):
        out = super().choices(param, space, ctx)
        if param == "mode":
            # int8 lowers nn.Linear layers only; torch.ao's dynamic int8 kernels are CPU kernels;
            # weight-only int8 needs the optional torchao
            out = [m for m in out if m not in INT8_MODES or (ctx.has_linear and not _int8_refused(m, ctx))]
            out = [m for m in out if m != STATIC_INT8 or not _static_int8_refused(ctx)]
        return out

    def suggest(self, trial, space, ctx: SearchContext) -> PrecisionConfig:
        mode = self.pick(trial, "mode", space, ctx)
        if mode == STATIC_INT8:  # the groups the sensitivity pass saw break int8 alone stay fp32
            return PrecisionConfig(mode=mode, groups=tuple((p, "fp32") for p in ctx.extras.get("int8_static_fp32", [])))
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
        if config.mode == "int8_dynamic":
            state.model = quantize_int8_dynamic(state.model)
            return
        if config.mode == "int8_weights":
            state.model = quantize_int8_weights(state.model)
            return
        if config.mode == STATIC_INT8:  # the engine quantizes the graph it exports (the model stays fp32)
            state.notes[STATIC_INT8] = {"keep_fp32": [p for p, m in config.groups if m == "fp32"]}
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
        execution = configs["execution"]
        ort = execution.backend == "onnxruntime"
        if cfg.mode.endswith("_autocast") and ort:
            return "autocast does not carry into an ONNX Runtime session"
        if any(m.endswith("_autocast") for _, m in cfg.groups) and ort:
            return "per-layer autocast regions do not carry into an ONNX Runtime session"
        if ort and not ctx.cuda and "bf16_weights" in (cfg.mode, *(m for _, m in cfg.groups)):
            # ORT's CPU provider has no bf16 Gemm/MatMul kernel (NOT_IMPLEMENTED at session
            # creation), and ONNX opset 17's Conv does not admit bf16 inputs (INVALID_GRAPH)
            return "ONNX Runtime's CPU provider has no bf16 kernels for Gemm/MatMul or Conv"
        if cfg.mode in INT8_MODES:
            return _int8_refused(cfg.mode, ctx, execution)
        if cfg.mode == STATIC_INT8:
            return _static_int8_refused(ctx, execution.backend)
        return None

    def graph_key(self, config: PrecisionConfig):
        # int8_static quantizes the fp32 export: candidates of either mode share it
        return PrecisionConfig() if config.mode == STATIC_INT8 else config


def _static_int8_refused(ctx: SearchContext, backend: str | None = None) -> str | None:
    """Why calibrated static int8 cannot be built here or with `backend` (None when it can)."""
    from ..engines import engines

    quantizers = [e.name for e in engines().values() if e.static_int8
                  and (ctx.onnxruntime if e.name == "onnxruntime" else e.available())]
    if ctx.cuda:
        return "int8_static is built for the CPU providers of the engines' quantizers here"
    if ctx.extras.get("traffic"):  # each bucket would calibrate on its first request, unrecorded
        return "int8_static calibrates at one input shape; a traffic tune's buckets have many"
    if not quantizers:
        return ("int8_static needs an engine with a static int8 quantizer: pip install 'autotiacc[onnx]' or "
                "'autotiacc[openvino]'")
    if backend is not None and backend not in quantizers:
        runs = "runs PyTorch's kernels" if backend in ("eager", "torchscript", "compile") else "is not installed here"
        return (f"int8_static is calibrated static int8 by an engine's quantizer ({', '.join(quantizers)}); "
                f"backend {backend} {runs}")
    return None


def _int8_refused(mode: str, ctx: SearchContext, execution=None) -> str | None:
    """Why an int8 mode cannot run here or with this backend (None when it can)."""
    if mode == "int8_dynamic" and ctx.cuda:
        return "torch.ao's dynamic int8 kernels (fbgemm/qnnpack) run on the CPU only"
    if mode == "int8_weights" and not ctx.torchao:
        return "int8_weights needs torchao: pip install 'autotiacc[quant]'"
    if execution is not None and execution.backend in INT8_BACKEND_REFUSALS.get(mode, {}):
        return INT8_BACKEND_REFUSALS[mode][execution.backend]
    return None


# Backends an int8 mode never builds with, or builds without its point (checked on torch 2.13
# CPU, onnxruntime 1.32, torchao 0.18; TorchScript and torch.compile build both modes).
INT8_BACKEND_REFUSALS: dict[str, dict[str, str]] = {
    "int8_dynamic": {"onnxruntime": "the ONNX exporter has no quantized::linear_dynamic (dynamic int8 Linear)"},
    "int8_weights": {"onnxruntime": "the ONNX export folds torchao's int8 weights back into fp32 constants: the "
                                    "session would run fp32 weights with int8 rounding error"},
}
