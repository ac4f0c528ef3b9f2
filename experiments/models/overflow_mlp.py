"""Done-means model for per-layer precision (issue 4): wide Linear layers where lowering can
pay on a CPU, and one layer (`big`) whose activations exceed float16's range (> 65504)
before a LayerNorm brings them back.

    autotiacc tune experiments/models/overflow_mlp.py --budget 5m
"""
import torch
from torch import nn

WIDTH = 1024


class OverflowMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(256, WIDTH)
        self.big = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.big.weight.mul_(1e5)  # outputs ~1e4-1e6: finite in fp32/bf16, inf in fp16
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.big(torch.relu(self.inp(x))))
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h)


def build_model() -> nn.Module:
    return OverflowMLP()


def example_inputs(batch_size: int = 64) -> tuple:
    return (torch.randn(batch_size, 256),)
