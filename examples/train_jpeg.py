"""Image classification whose dataset decodes JPEG bytes per item (the training contract).

The images are generated in memory (seeded shapes and noise, encoded with PIL): nothing is
downloaded. Decoding + normalising each item costs far more than the tiny convnet's step,
as with real JPEG pipelines on few CPU cores.

    autotiacc tune examples/train_jpeg.py --mode train --budget 5m

`raw_dataset()` and `device_transform()` are the optional hooks for decoding JPEG on the
training device (`decode=device`, searched when torchvision imports): the loader then only
reads the encoded bytes, and each batch is decoded at once by torchvision.io.decode_jpeg on
the GPU (or the CPU) and resized, flipped and normalised there.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

N_IMAGES = 512
SIZE = 224  # stored JPEG size (a typical photo crop); decoded and resized to INPUT
INPUT = 48
N_CLASSES = 4
batch_size = 32


def _jpeg(i: int, rng: np.random.Generator) -> tuple[bytes, int]:
    label = i % N_CLASSES
    noise = rng.integers(0, 255, size=(SIZE, SIZE, 3), dtype=np.uint8)
    img = Image.fromarray(noise // 2)
    draw = ImageDraw.Draw(img)
    x, y = rng.integers(8, SIZE // 2, size=2)
    shape = [int(x), int(y), int(x) + SIZE // 3, int(y) + SIZE // 3]
    colour = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40)][label]
    (draw.ellipse if label % 2 else draw.rectangle)(shape, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), label


@functools.lru_cache(maxsize=4)
def _jpegs(n: int, seed: int) -> tuple[tuple[bytes, int], ...]:
    """The encoded images, made once per process: train_dataset() and raw_dataset() share them."""
    rng = np.random.default_rng(seed)
    return tuple(_jpeg(i, rng) for i in range(n))


class JpegDataset(Dataset):
    """Holds encoded JPEG bytes; `load(i)` decodes (deterministic), `transform` augments (random)."""

    def __init__(self, n: int = N_IMAGES, seed: int = 0) -> None:
        self.items = _jpegs(n, seed)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.items[i]
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((INPUT, INPUT), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(), label  # uint8 CHW

    def transform(self, sample: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, int]:
        img, label = sample
        if torch.rand(()) < 0.5:  # random horizontal flip
            img = img.flip(-1)
        return (img.float() / 255.0 - 0.5) / 0.25, label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(i))


class EncodedJpegs(JpegDataset):
    """The same images, still encoded: items `(jpeg_bytes, label)`."""

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.items[i]


def device_transform(images: list[torch.Tensor]) -> torch.Tensor:
    """The batch's JPEGs decoded on the training device (uint8 CHW each) -> what collated
    `train_dataset()` items hold: resized to INPUT, randomly flipped, normalised."""
    if len({tuple(img.shape) for img in images}) == 1:  # one resize for the whole batch
        x = nn.functional.interpolate(torch.stack(images).float(), size=(INPUT, INPUT), mode="bilinear",
                                      antialias=True, align_corners=False)
    else:
        x = torch.cat([nn.functional.interpolate(img[None].float(), size=(INPUT, INPUT), mode="bilinear",
                                                 antialias=True, align_corners=False) for img in images])
    flip = torch.rand(len(images), device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return (x / 255.0 - 0.5) / 0.25


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, N_CLASSES))


def train_dataset() -> Dataset:
    return JpegDataset()


def raw_dataset() -> Dataset:
    return EncodedJpegs()


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def eval_fn(model: nn.Module) -> float:
    """Accuracy on 64 held-out images (optional hook; higher is better). The model comes on the
    device being tuned: the data goes where its weights are."""
    device = next(model.parameters()).device
    ds = JpegDataset(n=64, seed=1)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    labels = torch.tensor([ds.items[i][1] for i in range(len(ds))]).to(device)
    return float((model(images).argmax(1) == labels).float().mean())

