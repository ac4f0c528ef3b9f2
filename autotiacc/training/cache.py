"""A cache of decoded samples for datasets whose decoding dominates (JPEG, audio, ...).

What is cached must not change what training sees. A dataset may split an item into an
expensive deterministic `load(i)` and a cheap, possibly random `transform(sample)`: then
only `load` is cached and `transform` still runs per access (augmentations stay random).
Without that split the whole item is cached only if two reads of the same index under
different random seeds are equal (detected, not assumed); otherwise caching is refused.
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import UserInputError

DEFAULT_LIMIT_FRACTION = 0.25  # of available memory


def _share(obj: Any) -> Any:
    """Move tensors to shared memory so DataLoader workers read them without copies."""
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.share_memory_() if isinstance(t, torch.Tensor) else t, obj)


def _nbytes(obj: Any) -> int:
    import torch
    import torch.utils._pytree as pytree

    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor))


def _equal(a: Any, b: Any) -> bool:
    import torch
    import torch.utils._pytree as pytree

    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
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


def cache_mode(dataset: Any) -> str:
    """`load` (split protocol), `item` (deterministic items) or raise why it cannot be cached."""
    import torch

    if callable(getattr(dataset, "load", None)) and callable(getattr(dataset, "transform", None)):
        return "load"
    if len(dataset) == 0:
        raise UserInputError("`cache=memory`: the dataset is empty; nothing to cache.")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1)
        a = dataset[0]
        torch.manual_seed(2)
        b = dataset[0]
    finally:
        torch.random.set_rng_state(state)
    if not _equal(a, b):
        raise UserInputError("`cache=memory`: dataset[0] differs between two reads (random augmentation?), so "
                             "caching whole items would freeze it; give the dataset `load(i)` (deterministic "
                             "decode) and `transform(sample)` (augmentation) methods to cache only the decode.")
    return "item"


class DecodedCache:
    """Map-style dataset over a decoded copy of `dataset`; built eagerly, `build_s` records the cost."""

    def __init__(self, dataset: Any, *, limit_bytes: int | None = None) -> None:
        import psutil

        self.dataset, self.mode = dataset, cache_mode(dataset)
        load = dataset.load if self.mode == "load" else dataset.__getitem__
        n = len(dataset)
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
        item = self.items[i]
        return self.dataset.transform(item) if self.mode == "load" else item
