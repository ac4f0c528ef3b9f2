"""torchvision vit_b_16 with random weights (nothing downloaded). Needs the `examples` extra."""
import torch


def build_model() -> torch.nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


def example_inputs(batch_size: int = 1) -> tuple:
    return (torch.randn(batch_size, 3, 224, 224),)
