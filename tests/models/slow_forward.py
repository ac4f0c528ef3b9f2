"""A model with a slow forward, 0.8 s (its Python forward sleeps before two Linear layers), and
five test batches: checking it on them takes seconds, as a real model's does. A traced candidate
(TorchScript) records the layers only and runs without the sleep. For the tests of limits that
scale with the model (engine.limits): a fixed 10 s limit on a step of the final cannot hold it."""
import time

import torch
from torch import nn

SLEEP_S = 0.8


class SlowForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return self.layers(x)


def build_model() -> nn.Module:
    return SlowForward()


def example_inputs(batch_size: int = 2) -> tuple:
    return (torch.randn(batch_size, 16),)


def test_data():
    gen = torch.Generator().manual_seed(1)
    return [((torch.randn(2, 16, generator=gen),), None) for _ in range(5)]
