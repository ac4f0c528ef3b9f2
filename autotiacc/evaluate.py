"""What runs inside an isolated trial process: build candidates, guard accuracy, time them
interleaved with the fp32 eager baseline built in the same process.

Measuring the baseline again in every trial process costs one eager model, and makes every
trial's figure a side-by-side ratio rather than a comparison across minutes of drift.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

from .accuracy import compare_outputs
from .candidate import OptimizedModel, compile_stats
from .device import PeakMemory, is_meta, to_device, use_device
from .knobs import configs_from_params
from .measure import Timing, measure_interleaved

BASELINE = "baseline"


def evaluate(workload, candidates: dict[str, dict[str, dict]], *, device: str = "cpu", tolerance: float = 2e-2,
             target_s: float = 2.0, warmup_s: float = 3.0, prune_above: float | None = None,
             max_memory_mib: float | None = None) -> dict[str, Any]:
    """Evaluate each candidate ({name: {knob: {field: value}}}) against the baseline.

    Returns {"baseline": timing, "candidates": {name: result}}; a result's status is `ok`,
    `rejected` (accuracy, or peak memory over `max_memory_mib`), `failed` (raised while
    building or running) or `pruned` (a quick look said it is more than `prune_above` x the
    baseline's latency). Model, inputs and test data (targets too) go to `device`; each result's
    `trial_attrs` carry its peak memory (see `PeakMemory`). On `meta` it is a shape-only dry
    run: placement and shapes are checked, accuracy is not, and the timings mean nothing.
    """
    import torch

    use_device(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with PeakMemory(device) as base_mem:
        model = to_device(workload.build_model(), device)
        inputs = to_device(workload.example_inputs(), device)
        test = to_device(list(workload.test_data()), device)
        with torch.no_grad():
            refs = [model(*x) for x, _ in test]

    def baseline() -> Any:
        with torch.no_grad():
            return model(*inputs)

    results: dict[str, Any] = {}
    runners = {BASELINE: baseline}
    for name, values in candidates.items():
        res: dict[str, Any] = {"knobs": values}
        try:
            torch._dynamo.utils.counters.clear()
            with PeakMemory(device) as mem:  # its build, its weights and its calls on the test data
                cand = OptimizedModel(model, configs_from_params(values), example_inputs=inputs, device=device)
                res["build_s"] = cand.build_seconds
                outs = [cand(*x) for x, _ in test]
            res["compile"] = compile_stats()
            res["trial_attrs"] = memory_attrs(mem, base_mem)
            if is_meta(device):
                res.update(status="ok", note="meta device: shape-only dry run, accuracy not checked")
                runners[name] = (lambda c=cand: c(*inputs))
                results[name] = res
                continue
            acc = compare_outputs(outs, refs, tolerance=tolerance, metric=workload.metric,
                                  targets=[y for _, y in test])
            res["accuracy"] = acc.to_dict()
            over = memory_over(mem, max_memory_mib, device)
            if not acc.ok:
                res.update(status="rejected", reason=acc.reason)
            elif over:
                res.update(status="rejected", reason=over)
            else:
                res["status"] = "ok"
                runners[name] = (lambda c=cand: c(*inputs))
        except Exception as exc:  # noqa: BLE001 - a candidate failing is a result, not a crash
            res.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                       traceback=traceback.format_exc()[-4000:])
        results[name] = res
    if prune_above is not None and len(runners) == 2:
        quick = measure_interleaved(runners, device, min_rounds=5, target_s=min(0.5, target_s / 4),
                                    warmup_s=warmup_s)
        name = next(n for n in runners if n != BASELINE)
        ratio = quick[name].median / quick[BASELINE].median
        if ratio > prune_above:
            results[name].update(status="pruned", ratio=ratio, speedup=1 / ratio,
                                 reason=f"quick look: {1 / ratio:.2f}x speed-up, far from the best so far "
                                        f"({1 / prune_above:.2f}x would be needed to continue)",
                                 timing=quick[name].to_dict())
            return {"baseline": quick[BASELINE].to_dict(), "candidates": results}
    t0 = time.perf_counter()
    timings: dict[str, Timing] = measure_interleaved(runners, device, target_s=target_s, warmup_s=warmup_s)
    for name, t in timings.items():
        if name == BASELINE:
            continue
        r = t.median / timings[BASELINE].median
        results[name].update(timing=t.to_dict(), ratio=r, speedup=1 / r)
    return {"baseline": timings[BASELINE].to_dict(), "candidates": results,
            "measure_s": time.perf_counter() - t0}


def memory_attrs(mem: PeakMemory, base_mem: PeakMemory) -> dict[str, Any]:
    """trials.csv columns: the candidate's peak memory above what the process held before it
    was built (its weights, activations, workspace), the baseline's the same way, and the source."""
    return {"peak_mem_mib": round(mem.delta_mib, 2), "baseline_peak_mem_mib": round(base_mem.delta_mib, 2),
            "process_peak_mem_mib": round(mem.peak_mib, 2), "mem_source": mem.source}


def memory_over(mem: PeakMemory, max_memory_mib: float | None, device: str) -> str | None:
    """The reason a candidate breaks `--max-memory`, or None."""
    if max_memory_mib is None or mem.delta_mib <= max_memory_mib:
        return None
    return (f"peak memory {mem.delta_mib:.4g} MiB on {device} ({mem.source}) is over --max-memory "
            f"{max_memory_mib:.4g} MiB")
