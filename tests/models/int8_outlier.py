"""A model with one layer that static int8 breaks: `spiky` scales channel 0 of its input by 1e4
(and that channel's weights by 1e-4, so fp32 outputs stay ordinary). A per-tensor int8 scale
of the Linear's input is then set by the spike, and every other channel rounds to zero. The
`smooth` layers quantize within a few percent.
"""
import torch
from torch import nn


class Spiky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        scale = torch.ones(64)
        scale[0] = 1e4
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.lin.weight[:, 0] /= 1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.scale)


class Outlier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        self.spiky = Spiky()
        self.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.spiky(torch.relu(self.smooth(x)))))


def build_model() -> nn.Module:
    return Outlier()


def example_inputs(batch_size: int = 16) -> tuple:
    return (torch.randn(batch_size, 64),)
