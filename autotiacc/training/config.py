"""Training knobs: configs, their search (registered knobs of task "training", sampled from
the `training` strategy YAML like inference's), and JSON round trip.

Configs are frozen dataclasses with a `version`, validated with the fix in the message, and
serialised with the core's `{"_type", "_version", "_data"}` format (`knobs.config_to_dict`).
They are registered for the training task only: the inference tuner never searches a
DataLoader knob, and an inference plan never loads one. Optuna parameters are named
`section.field` (`data.num_workers`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import PlanError, UserInputError
from ..knobs.base import BuildState, Knob, KnobConfig, SearchContext, config_from_dict, config_to_dict, register

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("default", "foreach", "fused")
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
CACHES = ("none", "memory")
DECODES = ("dataset", "device")


def _check(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserInputError(f"`{name}` got {value!r}: use one of {', '.join(map(repr, allowed))}.")


@dataclass(frozen=True)
class DataConfig(KnobConfig):
    """DataLoader settings, the decoded-sample cache, and where JPEG is decoded."""

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2  # batches each worker keeps ready; used only with workers
    persistent_workers: bool = False
    cache: str = "none"  # "memory": decode every sample once, keep compact tensors in shared memory
    # "device": the loader reads raw_dataset() bytes; each step decodes the batch with
    # torchvision.io.decode_jpeg on the train device and runs device_transform (jpeg.py)
    decode: str = "dataset"

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise UserInputError(f"`num_workers` got {self.num_workers}: use 0 (main process) or more.")
        if self.prefetch_factor < 1:
            raise UserInputError(f"`prefetch_factor` got {self.prefetch_factor}: use 1 or more.")
        _check("cache", self.cache, CACHES)
        _check("decode", self.decode, DECODES)
        if self.decode == "device" and self.cache != "none":
            raise UserInputError("`cache=memory` with `decode=device`: the cache keeps decoded samples, device "
                                 "decoding reads encoded ones; use one or the other.")


@dataclass(frozen=True)
class ComputeConfig(KnobConfig):
    """How the step computes: compile, layout, optimizer kernels, gradient accumulation."""

    compile: bool = False
    channels_last: bool = False
    optimizer_impl: str = "default"
    micro_batches: int = 1  # the global batch is split and gradients accumulated: same global batch
    threads: int = 0  # intra-op threads during a step; 0 = torch's default. Fewer can win on busy cores

    def __post_init__(self) -> None:
        _check("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        if self.threads < 0:
            raise UserInputError(f"`threads` got {self.threads}: use 0 (torch's default) or a positive count.")
        if self.micro_batches < 1:
            raise UserInputError(f"`micro_batches` got {self.micro_batches}: use 1 (no accumulation) or more.")


@dataclass(frozen=True)
class TrainPrecisionConfig(KnobConfig):
    """Autocast dtype (GradScaler with fp16) and the modules kept in fp32 because they overflowed."""

    mode: str = "fp32"
    fp32_modules: tuple[str, ...] = ()  # filled by detection in the trial, recorded in the plan

    def __post_init__(self) -> None:
        _check("mode", self.mode, PRECISIONS)


@dataclass(frozen=True)
class MemoryConfig(KnobConfig):
    """Activation checkpointing of the blocks with the largest activations."""

    checkpoint_top: int = 0  # searched: how many blocks
    checkpoint_modules: tuple[str, ...] = ()  # resolved from a measured forward, recorded in the plan

    def __post_init__(self) -> None:
        if self.checkpoint_top < 0:
            raise UserInputError(f"`checkpoint_top` got {self.checkpoint_top}: use 0 (off) or more.")


@dataclass(frozen=True)
class DDPConfig(KnobConfig):
    """torch DistributedDataParallel settings; used only when a process group is running."""

    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    broadcast_buffers: bool = True
    comm_hook: str = "none"
    powersgd_rank: int = 1

    def __post_init__(self) -> None:
        if not self.bucket_cap_mb > 0:
            raise UserInputError(f"`bucket_cap_mb` got {self.bucket_cap_mb}: use a positive size in MB, e.g. 25.")
        _check("comm_hook", self.comm_hook, COMM_HOOKS)


SECTIONS: dict[str, type] = {"data": DataConfig, "compute": ComputeConfig, "precision": TrainPrecisionConfig,
                             "memory": MemoryConfig, "ddp": DDPConfig}
# plans written before the rename name the precision section "PrecisionConfig"
_BY_TYPE = {**{cls.__name__: cls for cls in SECTIONS.values()}, "PrecisionConfig": TrainPrecisionConfig}


@dataclass(frozen=True)
class TrainConfig:
    """One training candidate: every section, defaults being the baseline (num_workers=0, fp32)."""

    version: ClassVar[int] = 1
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    precision: TrainPrecisionConfig = field(default_factory=TrainPrecisionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)

    def to_list(self) -> list[dict[str, Any]]:
        return [config_to_dict(getattr(self, name)) for name in SECTIONS]

    @classmethod
    def from_list(cls, entries: Any) -> "TrainConfig":
        """Rebuild from JSON; only the five training config types are accepted."""
        if not isinstance(entries, list):
            raise PlanError(f"training config must be a list of knob entries, got {type(entries).__name__}.")
        parts: dict[str, Any] = {}
        for d in entries:
            cfg = config_from_dict(d, allowed=_BY_TYPE)
            parts[next(n for n, c in SECTIONS.items() if c is type(cfg))] = cfg
        return cls(**parts)

    def flat(self) -> dict[str, Any]:
        """{"data.num_workers": 0, ...}: Optuna parameter names and the report's columns."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    @classmethod
    def from_flat(cls, params: dict[str, Any]) -> "TrainConfig":
        parts = {}
        for s, kls in SECTIONS.items():
            fields = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(s + ".")}
            parts[s] = kls(**fields)
        return cls(**parts)

    def label(self) -> str:
        """Only what differs from the baseline, e.g. `num_workers=1, cache=memory`."""
        base = TrainConfig().flat()
        diff = [f"{k.split('.', 1)[1]}={v}" for k, v in self.flat().items() if v != base[k]
                and not k.endswith(("fp32_modules", "checkpoint_modules"))]
        return ", ".join(diff) or "baseline (num_workers=0, fp32)"


def train_context(*, cores: int, nproc: int, device: str, has_conv: bool, fused_ok: bool,
                  compile: bool, device_decode: bool = False) -> SearchContext:
    """What training knobs look at: the core count per process, processes, CUDA, the model, and
    whether JPEG can be decoded on the device (the file's hooks and torchvision, `jpeg.py`)."""
    return SearchContext(device=device, cores=cores, has_conv=has_conv,
                         extras={"nproc": nproc, "fused_ok": fused_ok, "compile": compile,
                                 "device_decode": device_decode})


class TrainKnob(Knob):
    """A training section. Sampled like every knob; applied as a whole `TrainConfig` by
    `training.apply` in the user's loop, not one by one on a built model."""

    task = "training"

    def param(self, field_name: str) -> str:
        return f"{self.name}.{field_name}"

    def apply(self, state: BuildState, config: KnobConfig) -> None:
        raise NotImplementedError("training knobs are applied together by autotiacc.training.apply")

    @staticmethod
    def per_proc_cores(ctx: SearchContext) -> int:
        return ctx.cores // max(1, ctx.extras.get("nproc", 1))


@register
class DataKnob(TrainKnob):
    name, config_cls, order = "data", DataConfig, 10
    cuda_only = {"pin_memory": {True}}

    def choices(self, param: str, space: dict[str, list], ctx: SearchContext) -> list:
        if param == "num_workers" and space.get(param) == "auto":
            return list(range(0, max(1, min(4, self.per_proc_cores(ctx))) + 1))
        if param == "decode" and not ctx.extras.get("device_decode"):
            space = {}  # no raw_dataset()/device_transform() hooks, or no torchvision
        return super().choices(param, space, ctx)

    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> DataConfig:
        nw = self.pick(trial, "num_workers", space, ctx)
        extra = {p: self.pick(trial, p, space, ctx) for p in ("prefetch_factor", "persistent_workers")} if nw else {}
        decode = self.pick(trial, "decode", space, ctx)
        if decode == "dataset":  # the cache keeps decoded samples: only where the dataset decodes
            extra["cache"] = self.pick(trial, "cache", space, ctx)
        return DataConfig(num_workers=nw, pin_memory=self.pick(trial, "pin_memory", space, ctx), decode=decode,
                          **extra)


@register
class ComputeKnob(TrainKnob):
    name, config_cls, order = "compute", ComputeConfig, 20

    def choices(self, param: str, space: dict[str, list], ctx: SearchContext) -> list:
        off = ((param == "compile" and not ctx.extras.get("compile", True))
               or (param == "channels_last" and not ctx.has_conv)
               or (param == "threads" and self.per_proc_cores(ctx) <= 1))
        out = super().choices(param, {} if off else space, ctx)
        return [c for c in out if not (param == "optimizer_impl" and c == "fused" and not ctx.extras.get("fused_ok"))]

    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> ComputeConfig:
        return ComputeConfig(**{p: self.pick(trial, p, space, ctx) for p in
                                ("compile", "channels_last", "optimizer_impl", "micro_batches", "threads")})


@register
class TrainPrecisionKnob(TrainKnob):
    name, config_cls, order = "precision", TrainPrecisionConfig, 30

    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> TrainPrecisionConfig:
        return TrainPrecisionConfig(mode=self.pick(trial, "mode", space, ctx))


@register
class MemoryKnob(TrainKnob):
    name, config_cls, order = "memory", MemoryConfig, 40

    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> MemoryConfig:
        return MemoryConfig(checkpoint_top=self.pick(trial, "checkpoint_top", space, ctx))


@register
class DDPKnob(TrainKnob):
    """Searched only with several processes (a process group runs)."""

    name, config_cls, order = "ddp", DDPConfig, 50
    cuda_only = {"comm_hook": {"bf16"}}  # torch's bf16 hook refuses gloo: "requires CUDA 11+ and NCCL 2.10+"

    def choices(self, param: str, space: dict[str, list], ctx: SearchContext) -> list:
        return super().choices(param, space if ctx.extras.get("nproc", 1) > 1 else {}, ctx)

    def suggest(self, trial, space: dict[str, list], ctx: SearchContext) -> DDPConfig:
        fields = {p: self.pick(trial, p, space, ctx) for p in
                  ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph", "broadcast_buffers", "comm_hook")}
        if fields["comm_hook"] == "powersgd":
            fields["powersgd_rank"] = self.pick(trial, "powersgd_rank", space, ctx)
        return DDPConfig(**fields)
