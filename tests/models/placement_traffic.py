"""A model.py with traffic() that proves placement on the traffic path: its forward raises unless
every input is on its weights' device, and records (instance, device, input shape) per call.
An instance is named by a serial, never reused: a freed model's id() may be given to the next one."""
import itertools
import weakref

import torch
from torch import nn

CALLS: list = []
_SERIALS = itertools.count()
_SERIAL_OF: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def _serial(module: nn.Module) -> int:
    if module not in _SERIAL_OF:  # a copy (deepcopy) is a new instance: a new serial
        _SERIAL_OF[module] = next(_SERIALS)
    return _SERIAL_OF[module]


class PlacedSeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight.device
        if x.device != w or mask.device != w:
            raise RuntimeError(f"inputs on {x.device}/{mask.device}, weights on {w}")
        CALLS.append((_serial(self), str(x.device), tuple(x.shape)))
        keep = mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return PlacedSeq()


def example_inputs(batch_size: int = 1, seq_len: int = 4) -> tuple:
    return torch.randn(batch_size, seq_len, 4), torch.ones(batch_size, seq_len, dtype=torch.bool)


def pad_inputs(inputs: tuple, seq_len: int) -> tuple:
    x, mask = inputs
    extra = seq_len - x.shape[1]
    if extra <= 0:
        return inputs
    return nn.functional.pad(x, (0, 0, 0, extra)), nn.functional.pad(mask, (0, extra), value=False)


def traffic() -> list:
    return [{"batch_size": 1, "seq_len": 3, "weight": 3}, {"batch_size": 2, "seq_len": 6, "weight": 2},
            {"batch_size": 3, "seq_len": 9, "weight": 1}]
