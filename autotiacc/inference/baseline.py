"""The one definition of the eager baseline every speed-up is taken against.

"Eager fp32" is the model as a user runs it today: built by `build_model()`, in `eval()` mode
(`Workload.build_model` sets it), called under `torch.no_grad()` on its inputs. One-shape
trials (`evaluate`), the final re-measurement and `verify` (`one_shape.OneShape`), traffic
trials and their final (`traffic_eval`) all time this same call, so "x over eager" means one
thing whatever the tune. (Traffic tunes used `torch.inference_mode()` before: a faster eager
than a user's, and another figure than one-shape tunes'.)
"""
from __future__ import annotations

from typing import Any


class EagerBaseline:
    """`model(*inputs)` under `torch.no_grad()`, the model in eval mode: call it to run it once."""

    def __init__(self, model: Any, inputs: tuple) -> None:
        self.model, self.inputs = model, tuple(inputs)

    def __call__(self) -> Any:
        return eager_call(self.model, self.inputs)


def eager_call(model: Any, inputs: tuple) -> Any:
    """One call of the eager baseline on `inputs` (see the module doc)."""
    import torch

    with torch.no_grad():
        return model(*inputs)
