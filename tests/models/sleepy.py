"""A model whose Python forward sleeps `AUTOTIACC_TEST_SLEEP_S` seconds (default 2 ms) before two
Linear layers. A traced candidate (TorchScript) records the layers only, so it runs without the
sleep: a winner the search and the final always find, whatever the machine's load. With a long
sleep it is a model with a slow forward (the workers inherit the variable)."""
import os
import time

import torch
from torch import nn


class Sleepy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("AUTOTIACC_TEST_SLEEP_S", "0.002")))
        return self.layers(x)


def build_model() -> nn.Module:
    return Sleepy()


def example_inputs(batch_size: int = 2) -> tuple:
    return (torch.randn(batch_size, 16),)
