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
from .knobs import configs_from_params
from .measure import Timing, measure_interleaved

BASELINE = "baseline"


def _to(obj: Any, device: str) -> Any:
    import torch
    import torch.utils._pytree as pytree

    if device == "cpu":
        return obj
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def evaluate(workload, candidates: dict[str, dict[str, dict]], *, device: str = "cpu", tolerance: float = 2e-2,
             target_s: float = 2.0, warmup_s: float = 3.0, prune_above: float | None = None) -> dict[str, Any]:
    """Evaluate each candidate ({name: {knob: {field: value}}}) against the baseline.

    Returns {"baseline": timing, "candidates": {name: result}}; a result's status is `ok`,
    `rejected` (accuracy), `failed` (raised while building or running) or `pruned` (a quick
    look said it is more than `prune_above` x the baseline's latency).
    """
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _to(workload.build_model(), device)
    inputs = _to(workload.example_inputs(), device)
    test = [(_to(x, device), y) for x, y in workload.test_data()]
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
            cand = OptimizedModel(model, configs_from_params(values), example_inputs=inputs, device=device)
            res["build_s"] = cand.build_seconds
            outs = [cand(*x) for x, _ in test]
            res["compile"] = compile_stats()
            acc = compare_outputs(outs, refs, tolerance=tolerance, metric=workload.metric,
                                  targets=[y for _, y in test])
            res["accuracy"] = acc.to_dict()
            if not acc.ok:
                res.update(status="rejected", reason=acc.reason)
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
