"""`autotiacc.training.DistributedDataParallel`: torch's DDP with a plan's DDP settings.

A drop-in: same constructor as `torch.nn.parallel.DistributedDataParallel` plus `plan=`.
Arguments the caller passes explicitly win over the plan's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as _TorchDDP

from .config import DDPConfig


def ddp_config_of(plan: Any) -> DDPConfig:
    if plan is None:
        return DDPConfig()
    if isinstance(plan, DDPConfig):
        return plan
    from .plan import as_config

    return as_config(plan).ddp


class DistributedDataParallel(_TorchDDP):
    """torch DDP whose bucket size, bucket views, static graph, buffer broadcast and
    communication hook come from `plan` (a TrainingPlan, TrainConfig, DDPConfig or path)."""

    def __init__(self, module: torch.nn.Module, *args: Any, plan: Any = None, **kwargs: Any) -> None:
        cfg = ddp_config_of(plan)
        kwargs.setdefault("bucket_cap_mb", cfg.bucket_cap_mb)
        kwargs.setdefault("gradient_as_bucket_view", cfg.gradient_as_bucket_view)
        kwargs.setdefault("static_graph", cfg.static_graph)
        kwargs.setdefault("broadcast_buffers", cfg.broadcast_buffers)
        super().__init__(module, *args, **kwargs)
        self.autotiacc_ddp = cfg
        self._comm_state = register_comm_hook(self, cfg)
        # Set after the reducer, so released after it: the process group's last reference is then
        # this Python one, whose destructor waits for gloo's threads without the GIL. Released by
        # the reducer instead (destroy_process_group() called while the model lives, then the
        # model dropped), it joins those threads holding the GIL while a thread still releasing a
        # Python hook's callback waits for the GIL: a deadlock (pytorch#56297).
        self._last_process_group_ref = self.process_group


def register_comm_hook(ddp: _TorchDDP, cfg: DDPConfig) -> Any:
    """Install the plan's gradient compression; returns the hook state (kept alive by the caller)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.comm_hook == "fp16":
        # torch's C++ fp16 compression: the same arithmetic as default_hooks.fp16_compress_hook,
        # with no Python callback for a gloo thread to run (or release) under the GIL
        builtin = getattr(ddp, "_register_builtin_comm_hook", None)  # private; absent: the Python hook
        if builtin is not None:
            builtin(torch.distributed.BuiltinCommHookType.FP16_COMPRESS)
        else:  # pragma: no cover - torch without the built-in hook
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.comm_hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif cfg.comm_hook == "powersgd":
        # start_powerSGD_iter=2: the first steps all-reduce exactly, as PowerSGD's warm start needs.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=1.0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    return None
