"""A model whose `big` layer's activations exceed float16's range (> 65504), then normalised.

Lowering `big` (or `norm`'s input) to fp16 turns them into inf; everything else survives fp16.
"""
import torch
from torch import nn


class Overflowing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 256)
        self.big = nn.Linear(256, 256)
        with torch.no_grad():
            self.big.weight.mul_(1e6)  # outputs around 1e5-1e6: finite in fp32/bf16, inf in fp16
        self.norm = nn.LayerNorm(256)
        self.mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.big(torch.relu(self.inp(x))))
        return self.head(h + self.mlp(h))


def build_model() -> nn.Module:
    return Overflowing()


def example_inputs(batch_size: int = 32) -> tuple:
    return (torch.randn(batch_size, 64),)
