"""The up-front check of a train.py's contract, once, in a child, before anything is written.

An empty dataset, a dataset smaller than one batch, a NaN or non-scalar loss: each used to fail
only at the baseline trial, after `run.json` and `study.db` were written (so a re-run on the
same `--out` was refused), with the message "give a larger --budget". Here the model is built,
the optimizer made, the first batch collated as the loader does and one whole step taken
(loss, backward, optimizer step), its peak memory measured as a trial measures it. The child
reports `TrainFacts`; the tuner's process never imports the training file.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..device import check_placement
from ..engine.usercode import Stage
from ..errors import WorkloadError


@dataclass
class TrainFacts:
    """What one step of the user's training file in a child found: enough to set up a search."""

    identity: dict[str, Any]
    samples: int
    batch_size: int
    has_conv: bool
    fused_ok: bool  # the optimizer takes fused=True
    device_decode: str | None  # why decode=device is not searched, None when it is
    loss: float  # the first step's loss
    peak_mib: float  # the process's peak memory over the build and the step, as a trial measures it
    memory_source: str
    first_run_s: float = 0.0


def check_training(workload: Any, device: str, nproc: int, stage: Stage) -> dict[str, Any]:
    """Runs in the child of `TrainWorkload.check` (module doc)."""
    import torch

    from ..device import PeakMemory, to_device
    from .jpeg import device_decode_unavailable

    t0 = time.perf_counter()
    _ = workload._user  # the import, and the three required functions
    with PeakMemory(device) as mem:
        stage.now = "build_model()"
        model = workload.build_model()
        check_placement(model, workload.path)
        model = to_device(model, device)
        stage.now = "make_optimizer()"
        opt = workload.make_optimizer(model.parameters())
        stage.now = "train_dataset()"
        dataset = workload.train_dataset()
        samples = check_dataset(dataset, workload, nproc)
        stage.now = "collating the first batch"
        batch = to_device(first_batch(dataset, workload), device)
        stage.now = "loss_fn(model, batch)"
        loss = check_loss(workload.loss_fn(model, batch), workload.path)
        stage.now = "the backward pass and optimizer.step() on the first batch's loss"
        loss.backward()
        opt.step()
    first_run_s = time.perf_counter() - t0
    stage.now = "reading the model"
    facts = TrainFacts(identity=workload.identity(model), samples=samples, batch_size=workload.batch_size,
                       has_conv=any(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
                       fused_ok="fused" in getattr(opt, "defaults", {}),
                       device_decode=device_decode_unavailable(workload),
                       loss=float(loss), peak_mib=round(mem.peak_mib, 2), memory_source=mem.source,
                       first_run_s=round(first_run_s, 3))
    return asdict(facts)


def check_dataset(dataset: Any, workload: Any, nproc: int) -> int:
    """The loader drops the last partial batch (each rank its own): fewer samples than one batch
    per rank would give no batch at all."""
    samples = len(dataset)
    need = workload.batch_size * nproc
    if samples == 0:
        raise WorkloadError(f"{workload.path}: train_dataset() is empty (len 0): there is nothing to train on; return "
                            "a dataset with at least one batch of samples.")
    if samples < need:
        raise WorkloadError(f"{workload.path}: train_dataset() has {samples} samples, fewer than one batch "
                            f"({workload.batch_size}" + (f" x {nproc} processes" if nproc > 1 else "") + "), and the "
                            "loader drops a partial batch; give more samples, or a smaller --batch-size.")
    return samples


def first_batch(dataset: Any, workload: Any) -> Any:
    """The first batch as the tuned DataLoader makes it (same batch size and collate_fn)."""
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(dataset, batch_size=workload.batch_size, collate_fn=workload.collate_fn)))


def check_loss(loss: Any, where: Any) -> Any:
    """`loss_fn(model, batch)` must return a finite scalar tensor that backpropagates."""
    import torch

    if not isinstance(loss, torch.Tensor):
        raise WorkloadError(f"{where}: loss_fn(model, batch) returned {type(loss).__name__}; it must return the loss "
                            "as a scalar torch.Tensor computed from the model's output (so it can backpropagate).")
    if loss.numel() != 1:
        raise WorkloadError(f"{where}: loss_fn(model, batch) returned a tensor of shape {list(loss.shape)}; it must "
                            "return a scalar: reduce it, e.g. with .mean() or reduction='mean'.")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise WorkloadError(f"{where}: loss_fn(model, batch) returned {value} on the first batch; the loss must be "
                            "finite: check the data (NaN/inf in it), log(0) or 0/0 in the loss, or the learning rate.")
    if not loss.requires_grad:
        raise WorkloadError(f"{where}: loss_fn(model, batch) returned a loss with no gradient (computed under no_grad "
                            "or detached); compute it from the model's output so it can backpropagate.")
    return loss.reshape(())
