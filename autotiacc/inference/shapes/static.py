"""The hooks of one input shape (`StaticShapes`), and the final re-measurement both hooks share
(`AlternatingFinal`). See `shape_tuning` for the hooks and the order the task calls them in."""
from __future__ import annotations

from typing import Any, Callable

from ...engine import limits
from ...engine.bench import Bench
from ...engine.fidelity import evaluate_alternating
from ...knobs import SearchContext


class AlternatingFinal:
    """The final re-measurement of both hooks: each variant alone in its own process, windows
    taken in turns (`evaluate_alternating`); what a window times is the hooks' `bench`."""

    final_measure_s: float

    def bench(self, candidates: dict[str, dict]) -> Bench | None:
        raise NotImplementedError

    def final_costs(self, costs: dict[str, limits.Cost] | None) -> dict[str, limits.Cost] | None:
        """The costs the final's limits derive from (`engine.limits`); None: one limit, the final's own."""
        return costs

    def final_measure(self, workload, candidates: dict[str, dict], *, device: str, tolerance: float,
                      warmup_s: float = 2.0, env: dict[str, str] | None = None, timeout: float,
                      log_path: str | None = None, costs: dict[str, limits.Cost] | None = None):
        return evaluate_alternating(workload, candidates, device=device, tolerance=tolerance,
                                    target_s=self.final_measure_s, warmup_s=warmup_s, env=env, timeout=timeout,
                                    bench=self.bench(candidates), costs=self.final_costs(costs))


class StaticShapes(AlternatingFinal):
    """One input shape: the knobs alone are searched, and `evaluate.evaluate` times them."""

    def __init__(self, strategy: Any = None, *, final_measure_s: float | None = None) -> None:
        self.final_measure_s = final_measure_s or float(getattr(strategy, "final_measure_s", 6.0))

    def suggest(self, trial, values: dict[str, dict], ctx: SearchContext | None = None) -> dict[str, Any]:
        return values

    def label(self, values: dict[str, Any]) -> str:
        return ""

    def evaluator(self, *, final: bool = False, measure_s: float = 2.0,
                  prune_above: float | None = None) -> tuple[Callable, dict[str, Any]]:
        from ..evaluate import evaluate

        if final:
            return evaluate, {"target_s": self.final_measure_s}
        return evaluate, {"target_s": measure_s, "prune_above": prune_above}

    def final_reserve(self, tops: list, *, process_s: float = 0.0, least: bool = False) -> float:
        """Seconds the final re-measurement of `tops` needs (`final_costs.one_shape_reserve`)."""
        from ..final_costs import one_shape_reserve

        return one_shape_reserve(tops, process_s, self.final_measure_s, least=least)

    def bench(self, candidates: dict[str, dict]) -> Bench | None:
        return None  # the workload's `default_bench()` (`one_shape.OneShape`): its example inputs

    def record(self, plan, values: dict[str, Any] | None, result: dict[str, Any] | None = None) -> None:
        plan.shapes = None
