"""autotiacc: profiling-guided auto-tuning of PyTorch inference and training.

`import autotiacc` is light: torch, optuna and matplotlib load when first used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (AutotiaccError, BudgetError, HardwareMismatchWarning, ModelRaisedError, PlanError,
                     PlanMismatchError, TrialError, UserInputError, WorkloadError)

from .version import __version__

__all__ = [
    "optimize", "load_plan", "Plan", "tune", "AutotiaccError", "BudgetError", "HardwareMismatchWarning",
    "ModelRaisedError", "PlanError", "PlanMismatchError", "TrialError", "UserInputError", "WorkloadError",
    "__version__", "BucketedModel", "parse_traffic",
]

_LAZY = {"optimize": "api", "load_plan": "inference.plan", "Plan": "inference.plan", "tune": "inference.task"}
_LAZY.update({"BucketedModel": "inference.shapes.bucketed", "parse_traffic": "inference.shapes.traffic"})  # dynamic shapes
# production reuse (issue 8)
__all__ += ["load_artifact", "verify_plan"]
_LAZY.update({"load_artifact": "inference.artifacts", "verify_plan": "inference.verify"})

if TYPE_CHECKING:  # pragma: no cover
    from .api import optimize
    from .inference.artifacts import load_artifact
    from .inference.plan import Plan, load_plan
    from .inference.task import tune
    from .inference.verify import verify_plan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "training":
        import importlib

        return importlib.import_module(".training", __name__)
    raise AttributeError(f"module 'autotiacc' has no attribute {name!r}")
