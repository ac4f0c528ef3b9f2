"""Decoding JPEG on the training device (`data.decode=device`), beside workers and the cache.

The loader then reads `raw_dataset()` items, `(encoded_jpeg, *targets)`, and collates the
encoded images as a list of uint8 tensors. Each step decodes that list in one batched
`torchvision.io.decode_jpeg(..., device=<train device>)` call (nvJPEG on CUDA, libjpeg-turbo
on the CPU) and hands the decoded images to the user's `device_transform(images)`, which
resizes, augments and normalises them on the device into the batch's image tensor.

torchvision is imported only here and only when used: it is not a dependency of autotiacc.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import PlanError

HOOKS = ("raw_dataset", "device_transform")


def decoder_unavailable() -> str | None:
    """Why torchvision's batched JPEG decoder cannot be used here, or None when it can."""
    try:  # a torchvision built for another torch raises at import (not only ImportError)
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable in this environment
        return f"torchvision does not import here ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return None


def device_decode_unavailable(workload: Any) -> str | None:
    """Why `decode=device` is not searched for `workload`, or None when it is: the training file
    must define both hooks, and torchvision must import (checked only when the hooks exist)."""
    missing = [h for h in HOOKS if workload.hook(h) is None]
    if missing:
        return f"the training file defines no {' or '.join(f'`{m}()`' for m in missing)}"
    return decoder_unavailable()


def load_decoder() -> Callable[..., Any]:
    """`torchvision.io.decode_jpeg`, or a PlanError that says how to get it."""
    import torch

    reason = decoder_unavailable()
    if reason is not None:
        raise PlanError(f"`decode=device` decodes JPEG with torchvision.io.decode_jpeg, but {reason}; install the "
                        f"torchvision release built for torch {torch.__version__}, or use a plan with "
                        "decode=dataset (re-tune without torchvision).")
    import warnings

    from torchvision.io import decode_jpeg

    # torchvision >= 0.29 warns on every decode that TorchCodec will supersede it; once is enough
    warnings.filterwarnings("once", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return decode_jpeg


def _as_bytes_tensor(data: Any) -> Any:
    import torch

    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise PlanError(f"raw_dataset() item's image is a {data.dtype} tensor of shape {tuple(data.shape)}; "
                            "it must be the encoded JPEG: bytes or a 1-D uint8 tensor.")
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise PlanError(f"raw_dataset() item's image is {type(data).__name__}; it must be the encoded JPEG: bytes "
                    "or a 1-D uint8 tensor, as `(jpeg, target, ...)`.")


def raw_collate(items: list[Any]) -> tuple[list[Any], ...]:
    """`[(jpeg, *targets), ...]` -> `([jpeg tensors], *collated targets)`: the encoded images stay a
    list (their lengths differ) and are decoded on the device in the step."""
    from torch.utils.data import default_collate

    if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 1:
        raise PlanError("raw_dataset() items must be tuples `(jpeg_bytes, target, ...)`; got "
                        f"{type(items[0]).__name__ if items else 'an empty batch'}.")
    images = [_as_bytes_tensor(item[0]) for item in items]
    rest = default_collate([tuple(item[1:]) for item in items])
    return (images, *rest)


def device_decoder(device_transform: Callable[[list[Any]], Any], device: Any) -> Callable[[Any], Any]:
    """The step's first stage under `decode=device`: a raw batch to the batch `loss_fn` takes,
    `(device_transform(decoded images), *targets)`, the images decoded on `device`."""
    import torch

    decode_jpeg = load_decoder()
    from torchvision.io import ImageReadMode

    target = torch.device(device)

    def decode(batch: Any) -> Any:
        images, *rest = batch
        if target.type == "cuda":
            # nvJPEG writes its outputs without waiting for the caller's stream, so it can be handed
            # (and overwrite) a block that the previous step's queued kernels still read: silently
            # wrong gradients (pytorch/vision#9606, meta-pytorch/torchcodec#1634). The decode
            # host-synchronises before returning anyway; this moves the wait before it.
            torch.cuda.current_stream(target).synchronize()
        decoded = decode_jpeg(list(images), mode=ImageReadMode.RGB, device=target)
        return (device_transform(decoded), *rest)

    return decode
