"""A cache of decoded samples for datasets whose decoding dominates (JPEG, audio, ...).

What is cached must not change what training sees. A dataset may split an item into an
expensive deterministic `load(i)` and a cheap, possibly random `transform(sample)` method:
then only `load` is cached and `transform` still runs per access (augmentations stay
random). A torchvision-style dataset with a `transform` *attribute* applied to the first
element of each item is cached with that attribute off, and the transform runs per access;
this is used only if it reproduces `dataset[0]` exactly under the same seed. Otherwise the
whole item is cached only if two reads of the same index under different random seeds are
equal (detected, not assumed); if not, caching is refused. Decoded PIL images are kept as
uint8 tensors in shared memory and turned back into images on access.
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import UserInputError
from ..torch_compat import tree_leaves, tree_map

DEFAULT_LIMIT_FRACTION = 0.25  # of available memory


class _Packed:
    """A decoded PIL image kept as a compact uint8 tensor (shared memory) plus its mode."""

    __slots__ = ("pixels", "mode")

    def __init__(self, image: Any) -> None:
        import numpy as np
        import torch

        self.pixels = torch.from_numpy(np.asarray(image).copy()).share_memory_()
        self.mode = image.mode

    def unpack(self) -> Any:
        from PIL import Image

        return Image.fromarray(self.pixels.numpy(), self.mode)


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "getbands")


def _share(obj: Any) -> Any:
    """Move tensors to shared memory (workers read them without copies); pack PIL images."""
    import torch

    return tree_map(lambda t: t.share_memory_() if isinstance(t, torch.Tensor)
                           else _Packed(t) if _is_pil(t) else t, obj)


def _unpack(obj: Any) -> Any:
    return tree_map(lambda t: t.unpack() if isinstance(t, _Packed) else t, obj)


def _nbytes(obj: Any) -> int:
    import torch

    leaves = [t.pixels if isinstance(t, _Packed) else t for t in tree_leaves(obj)]
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _equal(a: Any, b: Any) -> bool:
    import torch

    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _seeded(fn: Any, seed: int) -> Any:
    """Call `fn()` with torch's and Python's RNGs seeded, restoring them after."""
    import random

    import torch

    state, py_state = torch.random.get_rng_state(), random.getstate()
    try:
        torch.manual_seed(seed)
        random.seed(seed)
        return fn()
    finally:
        torch.random.set_rng_state(state)
        random.setstate(py_state)


def _has_transform_attr(dataset: Any) -> bool:
    return "transform" in vars(dataset) if hasattr(dataset, "__dict__") else False


def cache_mode(dataset: Any) -> str:
    """`load` (split protocol), `attr` (torchvision-style transform attribute), `item`
    (deterministic items), or raise why it cannot be cached."""
    if len(dataset) == 0:
        raise UserInputError("`cache=memory`: the dataset is empty; nothing to cache.")
    if callable(getattr(dataset, "load", None)) and callable(getattr(type(dataset), "transform", None)):
        return "load"
    if _has_transform_attr(dataset) and dataset.transform is not None:
        return "attr"
    if not _equal(_seeded(lambda: dataset[0], 1), _seeded(lambda: dataset[0], 2)):
        raise UserInputError("`cache=memory`: dataset[0] differs between two reads (random augmentation?), so "
                             "caching whole items would freeze it; give the dataset `load(i)` (deterministic "
                             "decode) and `transform(sample)` (augmentation) methods to cache only the decode.")
    return "item"


class DecodedCache:
    """Map-style dataset over a decoded copy of `dataset`; built eagerly, `build_s` records the cost."""

    def __init__(self, dataset: Any, *, limit_bytes: int | None = None) -> None:
        self.dataset, self.mode = dataset, cache_mode(dataset)
        self.transform = dataset.transform if self.mode != "item" else None
        load = dataset.load if self.mode == "load" else dataset.__getitem__
        n = len(dataset)
        if self.mode == "attr":
            dataset.transform = None  # decode without augmenting while the cache fills
        try:
            self._fill(load, n, limit_bytes)
        finally:
            if self.mode == "attr":
                dataset.transform = self.transform
        if self.mode == "attr" and not _equal(_seeded(lambda: dataset[0], 3), _seeded(lambda: self[0], 3)):
            raise UserInputError("`cache=memory`: applying the dataset's `transform` attribute to the cached first "
                                 "element does not reproduce dataset[0]; give the dataset `load(i)` and "
                                 "`transform(sample)` methods to say what may be cached.")

    def _fill(self, load: Any, n: int, limit_bytes: int | None) -> None:
        import psutil

        limit = limit_bytes if limit_bytes is not None else int(psutil.virtual_memory().available * DEFAULT_LIMIT_FRACTION)
        t0 = time.perf_counter()
        first = _share(load(0))
        estimate = _nbytes(first) * n
        if estimate > limit:
            raise UserInputError(f"`cache=memory`: {n} decoded samples need about {estimate / 2**20:.0f} MiB, over "
                                 f"the {limit / 2**20:.0f} MiB allowed; use cache=none or a smaller dataset.")
        self.items = [first] + [_share(load(i)) for i in range(1, n)]
        self.build_s = time.perf_counter() - t0
        self.nbytes = sum(_nbytes(x) for x in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        item = _unpack(self.items[i])
        if self.mode == "load":
            return self.transform(item)
        if self.mode == "attr":
            if not isinstance(item, (tuple, list)):
                return self.transform(item)
            return (self.transform(item[0]), *item[1:])
        return item
