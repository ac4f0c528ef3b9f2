"""`apply(plan, model, optimizer, dataset, loss_fn)`: a plan applied in the user's own loop.

Returns `(model, optimizer, loader, step)`: the model (wrapped in DDP when a process group
runs), the optimizer (kernel choice set), the tuned DataLoader, and `step(batch)` which runs
one optimizer step with the plan's precision, scaler, accumulation and compile, and returns
the loss. Wrap order is fixed: layout, precision fallbacks, checkpointing, DDP, compile last.
With `decode=device` the loader reads `raw_dataset` (encoded JPEG) and `step` first decodes
the batch on the model's device and runs `device_transform` (`jpeg.py`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from ..device import module_device, move_training, to_device
from ..errors import UserInputError
from ..knobs.runtime import thread_scope
from ..torch_compat import tree_flatten, tree_leaves, tree_map, tree_unflatten
from .config import DataConfig, TrainConfig


def _tree_map(fn: Callable, obj: Any) -> Any:
    return tree_map(fn, obj)


def batch_size_of(batch: Any) -> int:
    import torch

    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise UserInputError("`batch` holds no tensor with a batch dimension; collate_fn must return tensors "
                         "(or tuples/dicts of them) whose first dimension is the batch.")


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split every tensor of a batch along dim 0 into `parts` micro-batches (gradient accumulation)."""
    import torch

    if parts == 1:
        return [batch]
    leaves, spec = tree_flatten(batch)
    n = batch_size_of(batch)
    parts = min(parts, n)
    chunks = [torch.tensor_split(x, parts) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
              else [x] * parts for x in leaves]
    return [tree_unflatten([c[i] for c in chunks], spec) for i in range(parts)]


# -- model transforms --------------------------------------------------------------------------
def keep_fp32(model: Any, names: tuple[str, ...], device_type: str) -> None:
    """Run the named modules with autocast off and float inputs in fp32 (overflow fallback)."""
    import torch

    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise UserInputError(f"`fp32_modules` names {name!r}, which is not a submodule of this model; "
                                 "re-tune, or drop it from the plan.")
        mod = modules[name]
        orig = mod.forward

        def forward(*args: Any, _orig=orig, **kwargs: Any) -> Any:
            def cast(t: Any) -> Any:
                return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

            with torch.autocast(device_type, enabled=False):
                return _orig(*_tree_map(cast, args), **_tree_map(cast, kwargs))

        mod.forward = forward


def checkpoint_modules(model: Any, names: tuple[str, ...]) -> None:
    """Recompute the named blocks' activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise UserInputError(f"`checkpoint_modules` names {name!r}, which is not a submodule of this model.")
        mod = modules[name]
        orig = mod.forward
        mod.forward = (lambda *a, _orig=orig, **k: checkpoint(_orig, *a, use_reentrant=False, **k))


def set_optimizer_impl(optimizer: Any, impl: str) -> None:
    """Switch torch optimizers between their per-tensor, foreach and fused kernels."""
    if impl == "default":
        return
    if not hasattr(optimizer, "param_groups") or impl not in getattr(optimizer, "defaults", {}):
        raise UserInputError(f"`optimizer_impl={impl}`: {type(optimizer).__name__} has no {impl!r} option; "
                             "use optimizer_impl=default.")
    for group in [optimizer.defaults, *optimizer.param_groups]:
        group["foreach"] = impl == "foreach"
        group["fused"] = impl == "fused"


# -- the loader ------------------------------------------------------------------------------
def make_loader(dataset: Any, data: DataConfig, *, batch_size: int, collate_fn: Callable | None = None,
                shuffle: bool = True, seed: int = 0, cuda: bool = False) -> tuple[Any, dict[str, Any]]:
    """The tuned DataLoader (same order for the same seed whatever the workers) and notes."""
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader

    notes: dict[str, Any] = {}
    if data.cache == "memory":
        from .cache import DecodedCache

        dataset = DecodedCache(dataset)
        notes.update(cache_build_s=dataset.build_s, cache_mib=dataset.nbytes / 2**20, cache_mode=dataset.mode)
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=True)
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if data.num_workers:
        kwargs.update(prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers)
    if data.num_workers and "fork" in mp.get_all_start_methods():
        # fork shares the decoded cache and the user's classes (defined in a file loaded by path,
        # which a spawned worker could not unpickle); workers run one thread, so no OpenMP pool.
        kwargs["multiprocessing_context"] = "fork"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                        sampler=sampler, generator=gen, num_workers=data.num_workers,
                        pin_memory=data.pin_memory and cuda, collate_fn=collate_fn, drop_last=True, **kwargs)
    return loader, notes


# -- the step --------------------------------------------------------------------------------
def make_step(model: Any, optimizer: Any, loss_fn: Callable, config: TrainConfig, *,
              train_model: Any = None, decode: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
    """One optimizer step per call: micro-batches with accumulation, autocast, GradScaler (fp16).
    `decode` turns a raw loader batch into the batch `loss_fn` takes (decoding on the device)."""
    import torch

    device = module_device(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision.mode)
    scaler = torch.amp.GradScaler(device.type) if config.precision.mode == "fp16" else None
    run_model = train_model if train_model is not None else model
    parts = config.compute.micro_batches
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    channels_last = config.compute.channels_last

    def prepare(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    def step(batch: Any) -> Any:
        if config.compute.threads:  # set per step and restored: torch's thread count is process-wide
            with thread_scope(config.compute.threads):
                return run_step(batch)
        return run_step(batch)

    def run_step(batch: Any) -> Any:
        if decode is not None:  # inside the step: the device decode is part of what is timed
            batch = decode(batch)
        batch = _tree_map(prepare, to_device(batch, device))  # non_blocking from pinned memory
        optimizer.zero_grad(set_to_none=True)
        micro = split_batch(batch, parts)
        total_n = batch_size_of(batch)
        total = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if not ddp or i == len(micro) - 1 else model.no_sync()
            cast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with sync:
                with cast:
                    loss = loss_fn(run_model, mb)
                # weight by micro-batch size: the accumulated gradient equals the full batch's
                scaled = loss.float() * (batch_size_of(mb) / total_n)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total = total + scaled.detach()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return total

    step.scaler = scaler  # type: ignore[attr-defined]
    return step


def apply(plan: Any, model: Any, optimizer: Any, dataset: Any, loss_fn: Callable, *,
          batch_size: int | None = None, collate_fn: Callable | None = None, shuffle: bool = True,
          seed: int = 0, device: Any = None, raw_dataset: Any = None,
          device_transform: Callable | None = None) -> tuple[Any, Any, Any, Callable[[Any], Any]]:
    """Apply a training plan (TrainingPlan, TrainConfig, a plan.json path, or None = baseline).

    `model` is moved to `device` when one is given (else it stays where it is) and the optimizer's
    existing state follows it; `optimizer` must be built over the model's parameters. Batches
    move to the model's device in `step` (non-blocking when pinned). When a
    torch.distributed process group with more than one rank is running, the model is wrapped
    in `autotiacc.training.DistributedDataParallel` and the loader shards with a
    DistributedSampler. A plan with `decode=device` needs `raw_dataset` (items `(jpeg_bytes,
    *targets)`), `device_transform(decoded_images) -> images` and torchvision; the loader then
    yields encoded batches and `step` decodes them. Returns `(model, optimizer, loader, step)`.
    """
    import torch

    from .plan import as_config, load_training_plan, plan_batch_size

    if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
        plan = load_training_plan(plan)  # once: its config, batch size and fingerprint
    config = as_config(plan)
    _warn_if_other_machine(plan)
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"`model` got {type(model).__name__}: pass the torch.nn.Module being trained.")
    if not callable(loss_fn):
        raise UserInputError(f"`loss_fn` got {type(loss_fn).__name__}: pass loss_fn(model, batch) -> Tensor.")
    bs = batch_size or plan_batch_size(plan)
    if not bs or bs <= 0:
        raise UserInputError(f"`batch_size` got {bs!r}: pass batch_size=N (the global batch per process).")
    decode = None
    if config.data.decode == "device":
        dataset, collate_fn, decode = _device_decoding(raw_dataset, device_transform,
                                                       device if device is not None else module_device(model))
    move_training(model, optimizer, device if device is not None else module_device(model))
    device = module_device(model)
    model.train()
    if config.compute.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.precision.mode != "fp32" and config.precision.fp32_modules:
        keep_fp32(model, config.precision.fp32_modules, device.type)
    if config.memory.checkpoint_modules:
        checkpoint_modules(model, config.memory.checkpoint_modules)
    set_optimizer_impl(optimizer, config.compute.optimizer_impl)
    wrapped = model
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from .ddp import DistributedDataParallel

        wrapped = DistributedDataParallel(model, plan=config.ddp)
    train_model = torch.compile(wrapped) if config.compute.compile else wrapped
    loader, notes = make_loader(dataset, config.data, batch_size=bs, collate_fn=collate_fn, shuffle=shuffle,
                                seed=seed, cuda=device.type == "cuda")
    step = make_step(wrapped, optimizer, loss_fn, config, train_model=train_model, decode=decode)
    step.notes = notes  # type: ignore[attr-defined]
    return wrapped, optimizer, loader, step


def _device_decoding(raw_dataset: Any, device_transform: Callable | None, device: Any) -> tuple[Any, Callable, Callable]:
    """The loader's dataset and collate, and the step's decode, for `decode=device`."""
    from .jpeg import device_decoder, raw_collate

    if raw_dataset is None or not callable(device_transform):
        raise UserInputError("the plan decodes JPEG on the device (`decode=device`): pass `raw_dataset=` (items "
                             "`(jpeg_bytes, *targets)`) and `device_transform=` (decoded images -> image batch) to "
                             "apply, or use a plan with decode=dataset.")
    return raw_dataset, raw_collate, device_decoder(device_transform, device)


def _warn_if_other_machine(plan: Any) -> None:
    """A plan's figures hold where they were measured; say so when applied elsewhere."""
    import warnings

    from ..errors import HardwareMismatchWarning
    from ..hardware import fingerprint, fingerprint_differences
    from .plan import TrainingPlan

    if not isinstance(plan, TrainingPlan) or not plan.fingerprint:
        return
    diffs = fingerprint_differences(plan.fingerprint, fingerprint(plan.device))
    if diffs:
        warnings.warn("training plan was measured on other hardware/software: " + "; ".join(diffs)
                      + ". Its speed-up may not hold here; re-tune to be sure.", HardwareMismatchWarning, stacklevel=3)

