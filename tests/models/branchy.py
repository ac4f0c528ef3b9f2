"""A model with data-dependent control flow: a traced graph bakes in one branch.

Its test data exercises both branches, so a candidate that traced only one is wrong on
some batches and the accuracy guard must reject it.
"""
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x) * 3.0


def build_model() -> nn.Module:
    return Branchy()


def example_inputs(batch_size: int = 4) -> tuple:
    return (torch.rand(batch_size, 8) + 0.1,)  # positive: the trace takes branch `a`


def test_data():
    for sign in (1.0, -1.0, 1.0, -1.0):
        yield (sign * (torch.rand(4, 8) + 0.1),), None
