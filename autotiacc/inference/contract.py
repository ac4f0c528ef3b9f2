"""The up-front check of a model's whole contract, once, in a child, before anything is written.

Everything the search would otherwise find only after the budget is spent (every trial failed,
the baseline "rejected" against itself, exit 0 and a plan) is run here on the tiny scale of
one pass: the import, `build_model()` and where its weights live, `example_inputs()` and a
forward, `test_data()` batch by batch, `metric()` on the reference outputs, and the baseline
exactly as its trial builds it (a second forward on the same inputs, through the accuracy
guard, its peak memory measured). The child reports `ModelFacts`; the tuner's process never
imports the user's file (see `engine.usercode`).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..device import check_placement
from ..engine.usercode import Stage
from ..errors import WorkloadError
from .accuracy import compare_outputs, tensor_leaves

FIRST_FORWARD = "forward() on its example inputs"
# The optional hooks of a model.py the tuner needs to know about (never calls) in its process.
OPTIONAL_HOOKS = ("test_data", "metric", "traffic", "pad_inputs", "unpad_outputs")


@dataclass
class ModelFacts:
    """What one run of the user's code in a child found: enough to set up a search."""

    identity: dict[str, Any]
    module_names: list[str]
    has_conv: bool
    output: str  # e.g. "Tensor[2, 3]"
    has_linear: bool = False  # the int8 precision modes lower nn.Linear layers
    hooks: list[str] = field(default_factory=list)  # the optional hooks the file defines
    traffic: list | None = None  # the rows traffic() returned (parsed by the tuner), None without it
    traffic_error: str | None = None  # what traffic() raised, reported with the traffic checks
    guard_data: str = ""  # which data the accuracy guard compares on, e.g. "test_data(): 3 batches"
    baseline_peak_mib: float = 0.0  # the baseline's peak memory, measured as its trial measures it
    memory_source: str = ""
    first_run_s: float = 0.0  # import, build and the first forward: what a fresh process pays before it works


def check_contract(workload: Any, device: str, tolerance: float, stage: Stage) -> dict[str, Any]:
    """Runs in the child of `Workload.check`: the first run of the user's code (module doc)."""
    from ..device import to_device
    from ..knobs.int8 import has_linear

    where = workload.path or workload.name
    t0 = time.perf_counter()
    stage.now = "importing it"
    _ = workload._user  # the import, and the two required functions
    stage.now = "build_model()"
    model = workload.build_model()
    check_placement(model, where)
    model = to_device(model, device)
    stage.now = "example_inputs()"
    inputs = to_device(workload.example_inputs(), device)
    stage.now = FIRST_FORWARD
    out = first_forward(workload, model, inputs)
    first_run_s = time.perf_counter() - t0
    stage.now = "reading its parameters"
    facts = ModelFacts(identity=workload.identity(model), module_names=_module_names(model),
                       has_conv=_has_conv(workload, model), output=_describe(out), has_linear=has_linear(model),
                       hooks=[h for h in OPTIONAL_HOOKS if workload.user_hook(h) is not None],
                       first_run_s=round(first_run_s, 3))
    stage.now = "traffic()"
    facts.traffic, facts.traffic_error = _traffic_rows(workload)
    stage.now = "test_data()"
    test = to_device(workload.test_data(), device)  # targets too: the metric gets them on the device
    facts.guard_data = guard_data_label(workload, len(test))
    refs = reference_outputs(workload, model, test, where)
    stage.now = "metric()"
    check_metric(workload.metric, refs, [y for _, y in test], where)
    stage.now = "the baseline (a second forward on the same inputs)"
    facts.baseline_peak_mib, facts.memory_source = check_baseline(workload, model, inputs, test, refs, device=device,
                                                                  tolerance=tolerance, where=where)
    return asdict(facts)


def first_forward(workload: Any, model: Any, inputs: tuple) -> Any:
    """The model on its example inputs; a saved model's failure says which shapes it got,
    where it failed and which shapes it takes (`saved.forward_problem`)."""
    from ..errors import ModelRaisedError
    from .saved import forward_problem

    try:
        return workload.run_once(model, inputs)
    except ModelRaisedError as exc:
        if workload.kind not in ("torchscript", "export"):
            raise
        raise WorkloadError(forward_problem(workload.kind, workload.path, str(exc.__cause__ or exc), inputs,
                                            workload.exported_shapes)) from None


def guard_data_label(workload: Any, n: int) -> str:
    """Which data the accuracy guard compares on, as the plan and the report say it."""
    if workload.has_test_data:
        return f"test_data(): {n} batch{'es' if n != 1 else ''}"
    return f"seeded example_inputs: {n} batches"


def reference_outputs(workload: Any, model: Any, test: list, where: Any) -> list:
    """The fp32 eager outputs on each guard batch; a batch that raises is named with the error,
    and one whose reference holds no finite value at all (nothing to compare) is refused."""
    from ..errors import ModelRaisedError

    refs = []
    for i, (x, _) in enumerate(test):
        try:
            shapes = ", ".join(str(list(t.shape)) for t in x)
            what = f"test batch {i} (input shapes {shapes})" if workload.has_test_data else f"example inputs seed {i}"
            refs.append(workload.run_once(model, x, what=what))
        except ModelRaisedError as exc:
            if not workload.has_test_data:
                raise
            raise WorkloadError(f"{where}: test_data(): {exc}; make test_data() yield inputs the model accepts, "
                                "shaped like example_inputs().") from None
        leaves = tensor_leaves(refs[-1])
        if not any(bool(t.detach().isfinite().any()) for t in leaves):
            raise WorkloadError(f"{where}: the model's fp32 output on {_batch_name(workload, i)} holds no finite value "
                                "(all NaN or inf), so no candidate can be compared with it; fix the model (or its "
                                "weights) so the reference output is finite.")
    return refs


def check_metric(metric: Any, refs: list, targets: list, where: Any) -> None:
    """`metric(outputs, targets)` must give a finite real number on the reference outputs."""
    if metric is None:
        return
    for i, (ref, y) in enumerate(zip(refs, targets)):
        value = metric(ref, y)
        try:  # a one-element tensor or array, or a NumPy scalar, is a number
            number = value.item() if hasattr(value, "item") else value
        except (ValueError, RuntimeError):  # more than one element
            number = value
        if not isinstance(number, numbers.Real):
            raise WorkloadError(f"{where}: metric() returned {type(value).__name__} {_short(value)} on the reference "
                                f"outputs of test batch {i}; it must return a float (higher is better).")
        if not math.isfinite(float(number)):
            raise WorkloadError(f"{where}: metric() returned {float(number)} on the reference outputs of test batch "
                                f"{i}; it must return a finite float (higher is better): guard NaN (e.g. an empty "
                                "mask or 0/0) in it.")


def check_baseline(workload: Any, model: Any, inputs: tuple, test: list, refs: list, *, device: str,
                   tolerance: float, where: Any) -> tuple[float, str]:
    """Build and run the baseline as its trial does (eager fp32, a copy of the model, under the
    accuracy guard) and measure its peak memory the same way. Returns (peak MiB, source)."""
    from ..device import PeakMemory
    from ..knobs import configs_from_params
    from .candidate import OptimizedModel

    with PeakMemory(device) as mem:
        baseline = OptimizedModel(model, configs_from_params({}), example_inputs=inputs, device=device)
        outs = [baseline(*x) for x, _ in test]
    acc = compare_outputs(outs, refs, tolerance=tolerance, metric=workload.metric, targets=[y for _, y in test])
    if not acc.ok:
        raise WorkloadError(f"{where}: two forwards on the same inputs disagree ({acc.reason}), so even the unchanged "
                            "model would fail the accuracy guard; likely dropout or batch norm that stays in training "
                            "mode (F.dropout(..., training=True), model.train() in forward), randomness in forward "
                            "(torch.rand*, sampling), or state kept between calls (a cache, a counter); make forward "
                            "deterministic in eval mode.")
    return round(mem.delta_mib, 3), mem.source


def _traffic_rows(workload: Any) -> tuple[list | None, str | None]:
    fn = workload.user_hook("traffic")
    if fn is None:
        return None, None
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - reported by the tuner with the traffic checks' messages
        return None, f"{workload.path}: traffic() raised {type(exc).__name__}: {exc}"


def _batch_name(workload: Any, i: int) -> str:
    return f"test batch {i}" if workload.has_test_data else "its example inputs"


def _module_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_modules()] if hasattr(model, "named_modules") else []


def _has_conv(workload: Any, model: Any) -> bool:
    import torch

    if workload.kind in ("torchscript", "export"):
        return any("conv" in str(getattr(m, "original_name", type(m).__name__)).lower() for m in model.modules())
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) if hasattr(model, "modules") else False


def _describe(out: Any) -> str:
    leaves = tensor_leaves(out)
    return ", ".join(f"Tensor{list(t.shape)}" for t in leaves[:4]) + (" ..." if len(leaves) > 4 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
