"""What runs in each rank of a training trial: apply a candidate, guard its loss, and time it
side by side with the baseline (num_workers=0, fp32) built in the same process.

Timing uses the core harness (`measure_interleaved`) on *windows* of steps. A DataLoader
with workers prefetches while the other candidate runs; each window first takes (and times)
the prefetched batches without training on them, so that head start never counts for the
workers. Every count is fixed (no time-based stopping) so all ranks run the same
collectives in the same order.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
import warnings
from datetime import timedelta
from typing import Any, Callable, Iterator

from ..device import (PeakMemory, dist_backend, module_device, rank_device, synchronize, to_device,
                      use_device)
from ..measure import measure_interleaved
from .config import MemoryConfig, TrainConfig, TrainPrecisionConfig
from .loop import apply

GUARD_STEPS = 8
ROUNDS = 4
TRIAL_BUSY_WAIT_S = 1.0  # the most a one-process trial waits for a busy machine to go quiet before it retimes


def _cycle(loader: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _finite(x: float) -> bool:
    return math.isfinite(x)


def detect_overflow(model: Any, loss_fn: Callable, batch: Any, mode: str, *, max_rounds: int = 4) -> tuple[str, ...]:
    """Leaf modules where activations or gradients start to overflow under autocast.

    A module is blamed when its inputs are finite but its outputs are not (or beyond half the
    reduced dtype's range), forward or backward: downstream modules that merely receive an
    overflow are not. Blamed modules are put in fp32 on a copy and the probe step repeats
    until it is clean, since a fallback can reveal the next overflow. Those run in fp32 in the plan.
    """
    import copy

    import torch

    from .loop import keep_fp32

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    limit = torch.finfo(dtype).max / 2
    device = next(model.parameters()).device

    def over(ts: Any) -> bool:
        ts = ts if isinstance(ts, (tuple, list)) else (ts,)
        return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0 and
                   not bool(torch.isfinite(t).all() and t.detach().abs().max() < limit) for t in ts)

    kept: set[str] = set()
    for _ in range(max_rounds):
        probe = copy.deepcopy(model)
        keep_fp32(probe, tuple(sorted(kept)), device.type)
        bad: set[str] = set()
        handles = []
        for name, mod in probe.named_modules():
            if name and not any(True for _ in mod.children()):
                handles.append(mod.register_forward_hook(
                    lambda m, i, o, n=name, bad=bad: bad.add(n) if over(o) and not over(i) else None))
                handles.append(mod.register_full_backward_hook(
                    lambda m, gi, go, n=name, bad=bad: bad.add(n) if over(gi) and not over(go) else None))
        try:
            with torch.autocast(device.type, dtype=dtype):
                loss = loss_fn(probe, batch)
            with warnings.catch_warnings():  # the first layer's inputs need no grad; torch warns about it
                warnings.simplefilter("ignore", UserWarning)
                loss.float().backward()
        finally:
            for h in handles:
                h.remove()
        if not bad - kept:
            break
        kept |= bad
    return tuple(sorted(kept))


def heaviest_blocks(model: Any, loss_fn: Callable, batch: Any, k: int) -> tuple[str, ...]:
    """The `k` top-level blocks with the largest activations in a measured forward pass."""
    import torch

    sizes: dict[str, int] = {}
    handles = []
    for name, mod in model.named_children():
        if any(p.requires_grad for p in mod.parameters()):
            def hook(m, i, o, n=name):
                outs = o if isinstance(o, tuple) else (o,)
                sizes[n] = sizes.get(n, 0) + sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return tuple(n for n, _ in sorted(sizes.items(), key=lambda kv: -kv[1])[:k])


def resolve(config: TrainConfig, workload: Any, dataset: Any, batch_size: int, device: str = "cpu") -> TrainConfig:
    """Turn searched intents (precision mode, checkpoint count) into the concrete plan entries."""
    import torch
    from torch.utils.data import DataLoader

    needs = config.precision.mode != "fp32" or config.memory.checkpoint_top
    if not needs:
        return config
    probe = next(iter(DataLoader(dataset, batch_size=batch_size, collate_fn=workload.collate_fn)))
    probe = to_device(probe, device)
    model = to_device(workload.build_model(), device)
    precision, memory = config.precision, config.memory
    if config.precision.mode != "fp32":
        precision = TrainPrecisionConfig(mode=precision.mode, fp32_modules=detect_overflow(model, workload.loss_fn, probe, precision.mode))
    if config.memory.checkpoint_top:
        memory = MemoryConfig(checkpoint_top=memory.checkpoint_top,
                              checkpoint_modules=heaviest_blocks(model, workload.loss_fn, probe, memory.checkpoint_top))
    del model
    torch.manual_seed(0)
    return dataclasses.replace(config, precision=precision, memory=memory)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Run:
    """One applied candidate in this process: its step and an endless batch stream."""

    def __init__(self, workload: Any, config: TrainConfig, dataset: Any, batch_size: int, seed: int,
                 device: str = "cpu") -> None:
        model = to_device(workload.build_model(seed), device)  # before the optimizer: its state follows
        opt = workload.make_optimizer(model.parameters())
        raw = workload.raw_dataset() if config.data.decode == "device" else None
        self.model, self.opt, self.loader, self.step = apply(config, model, opt, dataset, workload.loss_fn,
                                                            batch_size=batch_size, collate_fn=workload.collate_fn,
                                                            seed=seed, raw_dataset=raw,
                                                            device_transform=workload.device_transform)
        self.batches = _cycle(self.loader)
        self.batch_size = batch_size
        self.buffer = config.data.num_workers * config.data.prefetch_factor

    def drain(self) -> None:
        """Take the batches the loader's workers prefetched while another candidate ran.

        Counted in the window: when they were ready this costs nothing, when they were not it
        is real loading time, so the figure can only err against the workers, never for them.
        """
        for _ in range(self.buffer):
            next(self.batches)

    def window(self, steps: int) -> Callable[[], None]:
        def run() -> None:
            self.drain()
            for _ in range(steps):
                loss = self.step(next(self.batches))
            synchronize(loss.device)  # the window's GPU work, and any failure in it, inside the timed call
        return run


def train_trial(workload: Any, config_list: list, *, reference_losses: list[list[float]] | None = None,
                tolerance: float = 0.05, guard_steps: int = GUARD_STEPS, rounds: int = ROUNDS,
                compare_baseline: bool = True, max_memory_mib: float | None = None, seed: int = 0,
                threads: int | None = None, gloo_timeout_s: float = 300.0, device: str = "cpu") -> dict[str, Any]:
    """Measure one candidate on this rank; returns figures, the loss curve and a status.

    `reference_losses[rank]` is the fp32 baseline's loss curve of this rank (same seed and data).
    status: `ok`, `rejected` (non-finite or off-curve loss, memory over the limit).
    Exceptions propagate: the sandbox reports them as a failed trial.
    """
    import torch.distributed as dist

    rank, world, device = _join_ranks(device, threads, gloo_timeout_s)
    # build_s: resolving, building and the first step (compile happens there), as inference's
    # build and first call; measure_s: the timed windows. The engine's budget split reads both.
    t0 = time.perf_counter()
    config = TrainConfig.from_list(config_list)
    dataset = workload.train_dataset()
    bs = workload.batch_size
    config = resolve(config, workload, dataset, bs, device)
    out: dict[str, Any] = {"rank": rank, "world": world, "config": config.to_list(), "label": config.label(),
                           "device": device}

    with PeakMemory(device) as mem:  # the candidate alone: built, and its guard steps
        cand = _Run(workload, config, dataset, bs, seed, device)
        out["notes"] = dict(getattr(cand.step, "notes", {}))
        losses = [float(cand.step(next(cand.batches)))]
        out["build_s"] = time.perf_counter() - t0
        losses += [float(cand.step(next(cand.batches))) for _ in range(guard_steps - 1)]
    out.update(losses=losses, peak_mem_mib=round(mem.peak_mib, 2), mem_source=mem.source)
    rejected = _guard(out, mem, max_memory_mib=max_memory_mib, reference=None, tolerance=tolerance)
    if rejected:
        return {**out, "status": "rejected", **rejected}
    if workload.eval_fn is not None and rank == 0:  # the user's metric after the guard steps, for the report
        out.update(run_eval(workload.eval_fn, cand.model))
    rejected = _guard(out, mem, max_memory_mib=None, reference=reference_losses, tolerance=tolerance)
    if rejected:  # off the baseline's loss curve: its metric above still tells how far
        return {**out, "status": "rejected", **rejected}

    base = None
    if compare_baseline:
        t0 = time.perf_counter()
        base = _Run(workload, TrainConfig(), dataset, bs, seed, device)
        out["build_s"] += time.perf_counter() - t0
    out.update(_timed_windows(cand, base, bs, rounds=rounds, device=device, world=world))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def _join_ranks(device: str, threads: int | None, gloo_timeout_s: float) -> tuple[int, int, str]:
    """(rank, world size, this rank's device): the process group joined when there are several."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:  # one GPU per rank: `cuda` means cuda:LOCAL_RANK, as torchrun does it
        device = rank_device(device, int(os.environ.get("LOCAL_RANK", rank)))
    use_device(device)
    if threads:
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(dist_backend(device), timeout=timedelta(seconds=gloo_timeout_s))
    return rank, world, device


def _timed_windows(cand: Any, base: Any, bs: int, *, rounds: int, device: str, world: int) -> dict[str, Any]:
    """The candidate's windows of steps, in turns with the baseline's (`base`, or None), and what
    they give: samples/s, the speed-up, the split of a step's time."""
    t0 = time.perf_counter()
    steps = max(4, cand.buffer)
    runners = {"candidate": cand.window(steps)}
    if base is not None:
        runners["baseline"] = base.window(steps)
    # the ranks' CPU time is the trial's own (peers); a retake after a busy machine only in one process,
    # as ranks that retook at different times would wait in each other's collectives
    timing = measure_interleaved(runners, device, min_rounds=rounds, max_rounds=rounds, warmup_s=0.0, peers=world,
                                 busy_wait_s=TRIAL_BUSY_WAIT_S if world == 1 else 0.0)
    per_s = {name: steps * bs / (t.median / 1e3) for name, t in timing.items()}
    out: dict[str, Any] = {"status": "ok", "window_steps": steps, "samples_per_s": per_s["candidate"],
                           "timing": {n: t.to_dict() for n, t in timing.items()}}
    if base is not None:
        out.update(baseline_samples_per_s=per_s["baseline"], speedup=per_s["candidate"] / per_s["baseline"])
    out.update(split_figures(cand, steps, rounds, device))
    return {**out, "measure_s": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib()}


def _guard(out: dict[str, Any], mem: PeakMemory, *, max_memory_mib: float | None,
           reference: list[list[float]] | None, tolerance: float) -> dict[str, Any] | None:
    """Why the candidate's guard steps (`out["losses"]` on `out["rank"]`) reject it, or None: a
    non-finite loss, peak memory over the limit, a loss off the fp32 baseline's curve (its relative
    difference lands in `out["loss_rel_diff"]`)."""
    losses, rank = out["losses"], out["rank"]
    if not all(_finite(x) for x in losses):
        return {"reason": f"loss became non-finite on rank {rank}: {losses}"}
    if max_memory_mib is not None and mem.peak_mib > max_memory_mib:
        return {"peak_rss_mib": _peak_rss_mib(), "reason": f"peak memory {mem.peak_mib:.0f} MiB ({mem.source}) over "
                                                         f"--max-memory {max_memory_mib:.0f} MiB on rank {rank}"}
    if not reference:
        return None
    tail = max(1, len(losses) // 4)
    mine, ref = sum(losses[-tail:]) / tail, sum(reference[rank][-tail:]) / tail
    rel = out["loss_rel_diff"] = abs(mine - ref) / max(abs(ref), 1e-8)
    if rel <= tolerance:
        return None
    return {"reason": f"loss after {len(losses)} steps {mine:.4g} vs fp32 baseline {ref:.4g} on rank {rank} "
                      f"({rel:.1%} apart, tolerance {tolerance:.0%})"}


def run_eval(eval_fn: Callable, model: Any) -> dict[str, Any]:
    """The user's `eval_fn(model)` in eval mode, for the report. It only decorates the report, so
    a failure (typically data built on the CPU for a model on the GPU) is recorded, not fatal."""
    import torch

    module = getattr(model, "module", model)
    module.eval()
    try:
        with torch.no_grad():
            return {"eval_metric": float(eval_fn(module))}
    except Exception as exc:  # noqa: BLE001 - the user's hook; the trial's figures stand without it
        return {"eval_error": f"eval_fn raised {type(exc).__name__}: {str(exc).strip()[:300]} (the model is on "
                              f"{module_device(module)}; put eval data on next(model.parameters()).device)"}
    finally:
        module.train()


def split_figures(run: _Run, steps: int, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """Loader-only and compute-only throughput (and, under DDP, the communication share)."""
    import torch

    bs = run.batch_size

    def load_only() -> None:
        run.drain()
        for _ in range(steps):
            next(run.batches)

    held = [next(run.batches) for _ in range(steps)]
    rounds = max(2, rounds // 2)

    def compute_only() -> None:
        for b in held:
            loss = run.step(b)
        synchronize(loss.device)

    fns = {"loader_only": load_only, "compute_only": compute_only}
    ddp = isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    if ddp:
        def no_comm() -> None:  # the same steps with gradient all-reduce skipped
            with run.model.no_sync():
                for b in held:
                    loss = run.step(b)
                synchronize(loss.device)
        fns["compute_no_comm"] = no_comm
    t = measure_interleaved(fns, device, min_rounds=rounds, max_rounds=rounds, warmup_s=0.0)
    loader_s = steps * bs / (t["loader_only"].median / 1e3)
    compute_s = steps * bs / (t["compute_only"].median / 1e3)
    out = {"loader_samples_per_s": loader_s, "compute_samples_per_s": compute_s,
           "bound": "data loading" if loader_s < compute_s else "compute"}
    if ddp:
        out["comm_share"] = max(0.0, 1 - t["compute_no_comm"].median / t["compute_only"].median)
    return out

