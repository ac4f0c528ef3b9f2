"""Training knob configs, their search space, and JSON round trip.

Configs are frozen dataclasses with a `version`, validated with the fix in the message, and
serialised with the core's `{"_type", "_version", "_data"}` format (`knobs.config_to_dict`).
They live in their own allowlist, not in the inference knob registry: the inference tuner
must never search a DataLoader knob.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import PlanError, UserInputError
from ..knobs.base import KnobConfig, config_from_dict, config_to_dict

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("default", "foreach", "fused")
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
CACHES = ("none", "memory")


def _check(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserInputError(f"`{name}` got {value!r}: use one of {', '.join(map(repr, allowed))}.")


@dataclass(frozen=True)
class DataConfig(KnobConfig):
    """DataLoader settings and the decoded-sample cache."""

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2  # batches each worker keeps ready; used only with workers
    persistent_workers: bool = False
    cache: str = "none"  # "memory": decode every sample once, keep compact tensors in shared memory

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise UserInputError(f"`num_workers` got {self.num_workers}: use 0 (main process) or more.")
        if self.prefetch_factor < 1:
            raise UserInputError(f"`prefetch_factor` got {self.prefetch_factor}: use 1 or more.")
        _check("cache", self.cache, CACHES)


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
class PrecisionConfig(KnobConfig):
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


SECTIONS: dict[str, type] = {"data": DataConfig, "compute": ComputeConfig, "precision": PrecisionConfig,
                             "memory": MemoryConfig, "ddp": DDPConfig}
_BY_TYPE = {cls.__name__: cls for cls in SECTIONS.values()}


@dataclass(frozen=True)
class TrainConfig:
    """One training candidate: every section, defaults being the baseline (num_workers=0, fp32)."""

    version: ClassVar[int] = 1
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
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


@dataclass
class TrainSpace:
    """What may be searched on this machine for this workload."""

    cores: int = 1
    nproc: int = 1
    cuda: bool = False
    has_conv: bool = False
    fused_ok: bool = True
    compile: bool = True


def suggest(trial, space: TrainSpace) -> TrainConfig:
    """Sample one candidate with Optuna (ask/tell: it is measured in other processes)."""
    cat = trial.suggest_categorical
    workers_max = max(1, min(4, space.cores // max(1, space.nproc)))
    nw = cat("data.num_workers", list(range(0, workers_max + 1)))
    data = DataConfig(
        num_workers=nw,
        pin_memory=cat("data.pin_memory", [False, True]) if space.cuda else False,
        prefetch_factor=cat("data.prefetch_factor", [2, 4]) if nw else 2,
        persistent_workers=cat("data.persistent_workers", [True, False]) if nw else False,
        cache=cat("data.cache", list(CACHES)))
    impls = list(OPTIMIZER_IMPLS) if space.fused_ok else ["default", "foreach"]
    compute = ComputeConfig(
        compile=cat("compute.compile", [False, True]) if space.compile else False,
        channels_last=cat("compute.channels_last", [False, True]) if space.has_conv else False,
        optimizer_impl=cat("compute.optimizer_impl", impls),
        micro_batches=cat("compute.micro_batches", [1, 2]),
        threads=cat("compute.threads", [0, 1]) if space.cores // max(1, space.nproc) > 1 else 0)
    precision = PrecisionConfig(mode=cat("precision.mode", list(PRECISIONS)))
    memory = MemoryConfig(checkpoint_top=cat("memory.checkpoint_top", [0, 1]))
    ddp = DDPConfig()
    if space.nproc > 1:
        hook = cat("ddp.comm_hook", list(COMM_HOOKS))
        ddp = DDPConfig(bucket_cap_mb=cat("ddp.bucket_cap_mb", [1.0, 5.0, 25.0, 100.0]),
                        gradient_as_bucket_view=cat("ddp.gradient_as_bucket_view", [False, True]),
                        static_graph=cat("ddp.static_graph", [False, True]),
                        broadcast_buffers=cat("ddp.broadcast_buffers", [True, False]),
                        comm_hook=hook,
                        powersgd_rank=cat("ddp.powersgd_rank", [1, 2]) if hook == "powersgd" else 1)
    return TrainConfig(data=data, compute=compute, precision=precision, memory=memory, ddp=ddp)


def seeds(space: TrainSpace) -> list[dict[str, Any]]:
    """Candidates tried first (after the baseline): the usual big wins, so a short budget finds them."""
    out: list[dict[str, Any]] = [{"data.cache": "memory"}, {"data.num_workers": min(space.cores, 2) // max(1, space.nproc) or 1},
                                 {"data.cache": "memory", "precision.mode": "bf16"}]
    if space.cuda:  # on a GPU lead with what pays there: autocast, pinned copies, NHWC, fused kernels, compile
        gpu: dict[str, Any] = {"data.cache": "memory", "data.pin_memory": True, "precision.mode": "bf16",
                               "compute.optimizer_impl": "fused" if space.fused_ok else "foreach"}
        if space.has_conv:
            gpu["compute.channels_last"] = True
        out = [gpu, {**gpu, "precision.mode": "fp16"}] + ([{**gpu, "compute.compile": True}] if space.compile else []) + out
    if space.nproc > 1:
        out += [{"data.cache": "memory", "ddp.comm_hook": "fp16", "ddp.gradient_as_bucket_view": True},
                {"data.cache": "memory", "ddp.bucket_cap_mb": 5.0, "ddp.static_graph": True}]
    return out
