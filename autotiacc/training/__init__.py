"""Training acceleration: tune a `train.py` (`autotiacc tune train.py --mode train`) and apply
the plan in the user's own loop:

    model, optimizer, loader, step = autotiacc.training.apply(plan, model, optimizer, dataset, loss_fn)
    for batch in loader:
        loss = step(batch)

`DistributedDataParallel` is a drop-in for torch's DDP that applies a plan's DDP settings.
Heavy parts (torch) load on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["apply", "DistributedDataParallel", "TrainingPlan", "TrainConfig", "DataConfig", "ComputeConfig",
           "TrainPrecisionConfig", "MemoryConfig", "DDPConfig", "load_training_plan", "tune_training",
           "TrainTuneOptions", "load_train_workload"]

_LAZY = {"apply": "loop", "DistributedDataParallel": "ddp", "TrainingPlan": "plan", "load_training_plan": "plan",
         "TrainConfig": "config", "DataConfig": "config", "ComputeConfig": "config", "TrainPrecisionConfig": "config",
         "MemoryConfig": "config", "DDPConfig": "config", "tune_training": "tuner", "TrainTuneOptions": "tuner",
         "load_train_workload": "workload"}

if TYPE_CHECKING:  # pragma: no cover
    from .loop import apply
    from .config import ComputeConfig, DataConfig, DDPConfig, MemoryConfig, TrainConfig, TrainPrecisionConfig
    from .ddp import DistributedDataParallel
    from .plan import TrainingPlan, load_training_plan
    from .tuner import TrainTuneOptions, tune_training
    from .workload import load_train_workload


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autotiacc.training' has no attribute {name!r}")
