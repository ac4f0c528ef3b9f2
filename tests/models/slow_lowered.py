"""Two Linear layers that sleep while their weights are lowered, for the profile's cap tests:
`AUTOTIACC_TEST_SLOW_LOWERED_S` seconds per lowered call (unset: no sleep). The worker process
inherits the variable, so a test makes the sensitivity analysis outlast its share at will.
`AUTOTIACC_TEST_SLOW_EAGER_S` seconds per fp32 call run by Python (unset: none): a traced
TorchScript copy never sleeps, so it is faster by construction, however loaded the machine."""
import os
import time

import torch
from torch import nn


class SlowWhenLowered(nn.Linear):
    lowered_calls = 0  # in this process: how many forwards ran lowered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.float32:
            SlowWhenLowered.lowered_calls += 1
            time.sleep(float(os.environ.get("AUTOTIACC_TEST_SLOW_LOWERED_S", "0")))
        elif os.environ.get("AUTOTIACC_TEST_SLOW_EAGER_S") and not torch.jit.is_tracing():
            time.sleep(float(os.environ["AUTOTIACC_TEST_SLOW_EAGER_S"]))
        return super().forward(x)


def build_model() -> nn.Module:
    return nn.Sequential(SlowWhenLowered(256, 256), nn.ReLU(), SlowWhenLowered(256, 256))


def example_inputs(batch_size: int = 16) -> tuple:
    return (torch.randn(batch_size, 256),)
