"""A model.py that proves placement: its forward raises unless its input is on its weights'
device, and records in CALLS (instance id, device, process flags) for every call it sees."""
import torch
from torch import nn

CALLS: list = []


class Placed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from autotiacc.device import read_flags

        if x.device != self.conv.weight.device:
            raise RuntimeError(f"input on {x.device}, weights on {self.conv.weight.device}")
        CALLS.append((id(self), str(x.device), read_flags()))
        return self.head(self.conv(x).mean(dim=(2, 3)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Placed()


def example_inputs(batch_size: int = 2) -> tuple:
    return (torch.randn(batch_size, 3, 8, 8),)


def test_data():
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        yield (torch.randn(2, 3, 8, 8, generator=g),), torch.tensor([0, 1])


def metric(outputs, targets) -> float:
    if outputs.device != targets.device:
        raise RuntimeError(f"outputs on {outputs.device}, targets on {targets.device}")
    return float((outputs.argmax(1) == targets).float().mean())
