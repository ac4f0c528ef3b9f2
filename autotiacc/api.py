"""The one-function API: `autotiacc.optimize(model, example_inputs, ...)`."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from .durations import parse_duration


def optimize(model: Any, example_inputs: Any, *, level: int = 1, budget: str | float = "5m",
             test_data: Iterable | None = None, metric: Any = None, strategy: str = "inference-latency",
             tolerance: float | None = None, out_dir: str | Path | None = None, device: str = "auto",
             seed: int = 0, quiet: bool = True):
    """Tune `model` on this machine and return an optimized callable used exactly like it.

    Trials run in worker processes that never import the caller's `__main__`: `model` is sent
    to them with cloudpickle (a class defined in a script, `python -` or a notebook travels by
    value), so this works from a script without a `__main__` guard, a notebook, or a module.
    The run directory (plan.json, report, trials) is `out_dir`, else a temporary folder;
    the returned callable has `.plan` and `.run_dir` attributes. `device` (auto: CUDA when
    available, else CPU) is where it is tuned and where `model` is moved to run.
    """
    from .device import resolve_device
    from .inference.task import TuneOptions, tune
    from .inference.workload import workload_from_module
    from .report import write_report

    device = resolve_device(device, allow_meta=False, name="device")
    workload = workload_from_module(model, example_inputs, test_data=test_data, metric=metric)
    _check_sendable(workload)
    run_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"autotiacc-{workload.name}-"))
    options = TuneOptions(budget_s=parse_duration(budget, name="budget"), out_dir=run_dir, level=level,
                          strategy=strategy, tolerance=tolerance, device=device, seed=seed,
                          command=f"autotiacc.optimize(level={level}, budget={budget!r})")
    progress = None if quiet else (lambda e: print(f"[autotiacc {time.strftime('%H:%M:%S')}] {e}"))
    result = tune(workload, options, progress)
    write_report(run_dir)
    fast = result.plan.apply(model, workload.example_inputs(), device=device)
    fast.plan, fast.run_dir = result.plan, run_dir
    return fast


def _check_sendable(workload) -> None:
    """The model, inputs, test data and metric go to worker processes: fail before any work."""
    import cloudpickle

    from .errors import WorkloadError

    try:
        cloudpickle.dumps(workload)
    except Exception as exc:  # noqa: BLE001 - e.g. a lock, an open file or a socket held by the model
        raise WorkloadError(f"`model` (or its inputs, test data or metric) cannot be sent to a worker process: "
                            f"{type(exc).__name__}: {exc}; remove the unpicklable attribute (a lock, open "
                            "file or connection) from the module before calling optimize().") from None
