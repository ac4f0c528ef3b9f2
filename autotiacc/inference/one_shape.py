"""The one-shape bench (`engine.bench.Bench`): a variant built from the workload's example
inputs, checked against the eager reference, and timed in windows of calls; the engine gets it
from `Workload.default_bench()` wherever a caller names no other bench."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.bench import Bench
from ..engine.limits import REWARM_CALLS, WINDOW_CALLS


@dataclass(frozen=True)
class OneShape(Bench):
    """One input shape, the workload's example inputs; a window is one untimed call, then calls
    for `window_s` (at least `WINDOW_CALLS`), its figure their median."""

    describe = "calls at one input shape"  # not a field: the repr stays "OneShape()"

    def build(self, workload, values: dict | None, *, device: str, tolerance: float) -> tuple[Any, dict[str, Any]]:
        from ..torch_compat import dynamo_reset
        from .accuracy import compare_outputs
        from .evaluate import build_candidate, build_report, reference_for

        if values is None:  # the eager baseline alone: no reference outputs to compute
            return _eager_baseline(workload, device), {}
        ref = reference_for(workload, device)
        dynamo_reset()
        cand = build_candidate(ref, values)
        acc = compare_outputs([cand(*x) for x, _ in ref.test], ref.refs, tolerance=tolerance,
                              metric=workload.metric, targets=[y for _, y in ref.test])
        if not acc.ok:
            raise ValueError(f"accuracy: {acc.reason}")
        # the int8 scales it was built with go into the plan, which replays them (`Plan.engine_records`)
        records = {k: r["record"] for k, r in cand.notes.items() if isinstance(r, dict) and "record" in r}
        return (lambda: cand(*ref.inputs)), {"build_s": cand.build_seconds, "accuracy": acc.to_dict(),
                                             **build_report(cand), "engine_records": records}

    def window(self, runner: Any, *, device: str, window_s: float) -> dict[str, Any]:
        from ..measure import measure

        # one untimed call first refills the caches another process's window emptied
        return {"samples_ms": measure(runner, device, min_reps=WINDOW_CALLS, target_s=window_s, warmup_s=0,
                                      min_warmup=REWARM_CALLS).samples_ms}


def _eager_baseline(workload, device: str) -> Any:
    from ..device import to_device, use_device
    from .baseline import EagerBaseline

    use_device(device)
    return EagerBaseline(to_device(workload.build_model(), device), to_device(workload.example_inputs(), device))
