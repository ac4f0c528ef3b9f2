"""Tiny model.py following the contract: two Linear layers."""
import torch
from torch import nn


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def example_inputs(batch_size: int = 2) -> tuple:
    return (torch.randn(batch_size, 16),)
