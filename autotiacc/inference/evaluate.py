"""What runs inside a trial worker: build candidates, guard accuracy, time them interleaved
with the fp32 eager baseline built in the same process.

Measuring the baseline beside every candidate makes every trial's figure a side-by-side ratio
rather than a comparison across minutes of drift. A warm worker evaluates candidate after
candidate, so the model, its test data, the fp32 references and the eager baseline are built
(and the baseline warmed up) once per workload and device, and reused: `_Reference`.
"""
from __future__ import annotations

import functools
import time
import traceback
from typing import Any, Callable

from ..device import PeakMemory, is_meta, read_flags, set_flags, to_device, use_device
from ..knobs import configs_from_params
from ..measure import Pace, Timing, TooSlow, measure_interleaved, time_once, warm_up
from ..torch_compat import clear_dynamo_counters, dynamo_reset
from .accuracy import compare_outputs
from .baseline import EagerBaseline, eager_call
from .candidate import OptimizedModel, compile_stats

BASELINE = "baseline"
WARM_BASELINE_S = 0.3  # a baseline already warmed in this worker only needs its caches refilled
# A candidate whose calls run HOPELESS x the pruning bound is stopped at its second slow call,
# before its warm-up and quick look (fp16 on a CPU without fp16 units: 100x slower, 25 s of
# calls per trial). The margin keeps a recompile or a CUDA-graph capture from tripping it.
HOPELESS = 4.0
# A search trial stops timing once the ratio's 95 % interval is within +-5 %: the final
# re-measurement, in fresh processes, decides the plan; the search only has to rank.
SETTLE_REL = 0.05
TRIAL_BUSY_WAIT_S = 1.0  # a trial timed while the machine was busy waits this long at most for quiet, then retimes


class _Reference:
    """One workload's eager fp32 model on a device, its inputs, test data and outputs, and its
    `baseline` (`baseline.EagerBaseline`). The pace figures (`test_ms`, `baseline_ms`) are taken
    when a trial first asks: a final's candidate process never does (on a model with a 1 s
    forward they are seven seconds)."""

    def __init__(self, workload, device: str) -> None:
        # a module is a pytree leaf: to_device moves it too (a tensor-only map left it on the CPU)
        self.device = device
        with PeakMemory(device) as self.memory:
            self.model = to_device(workload.build_model(), device)
            self.inputs = to_device(workload.example_inputs(), device)
            self.baseline = EagerBaseline(self.model, self.inputs)
            self.test = to_device(list(workload.test_data()), device)  # targets too, for the user's metric
            # what the tuner's processes build candidates of this model with (`build_candidate`)
            token = getattr(workload, "token", None)
            self.reuse_key = (token, device) if token else None
            self.refs = [eager_call(self.model, x) for x, _ in self.test]
        self.warmed = False

    @functools.cached_property
    def test_ms(self) -> list[float]:
        """Each test batch's warm call (a first call can take 100x a tiny model's): they pace the candidates'."""
        return [time_once(lambda x=x: eager_call(self.model, x), self.device) for x, _ in self.test]

    @functools.cached_property
    def baseline_ms(self) -> float:
        return min(time_once(self.baseline, self.device) for _ in range(3))


# The reference of the last workload this worker evaluated: (key, _Reference). One only, so a
# worker never holds two models; a key is the workload's token (same object in the tuner) + device.
_CACHE: list = [None, None]


def worker_cached(key: Any, build: Callable[[], Any]) -> Any:
    """This worker's one cached reference: `build()` unless the last call had the same `key`."""
    if _CACHE[0] != key:
        _CACHE[:] = [None, None]  # free the old model before building the new one
        _CACHE[:] = [key, build()]
    return _CACHE[1]


def build_candidate(ref: _Reference, values: dict[str, dict]) -> OptimizedModel:
    """A candidate of `ref`'s model as the tuner's processes build it: an engine that calibrates
    (int8_static) does so on the test data, and graphs of earlier candidates of this workload
    are reused where only run settings differ (`engines.cache`); `build_report` says what."""
    from ..engines.cache import BUILDS

    saved = BUILDS.saved_s
    cand = OptimizedModel(ref.model, configs_from_params(values), example_inputs=ref.inputs, device=ref.device,
                          calibration=[x for x, _ in ref.test], reuse_key=ref.reuse_key)
    cand.reused_s = BUILDS.saved_s - saved
    return cand


def build_report(cand: OptimizedModel) -> dict[str, Any]:
    """Trial attributes of a built candidate: the build seconds its reuse saved, the options its
    ONNX Runtime session really has (read back from it), what int8_static quantized."""
    out: dict[str, Any] = {"reused_s": round(getattr(cand, "reused_s", 0.0), 3)}
    if "session" in cand.notes:
        out["ort_session"] = cand.notes["session"]
    record = (cand.notes.get("int8_static") or {}).get("record")
    if record:
        out["int8_static"] = {k: v for k, v in record.items() if k != "ranges"}
    return out


def workload_key(workload) -> Any:
    return getattr(workload, "token", None) or id(workload)


def reference_for(workload, device: str) -> _Reference:
    use_device(device)  # cuda:N is this process's current device (events, streams, graphs)
    return worker_cached((workload_key(workload), device), lambda: _Reference(workload, device))


def _flags() -> dict[str, Any]:
    """Process-wide torch settings a knob may change while building; restored after each evaluation."""
    import torch

    return {"threads": torch.get_num_threads(), **read_flags()}


def _restore_flags(flags: dict[str, Any]) -> None:
    import torch

    if torch.get_num_threads() != flags["threads"]:
        torch.set_num_threads(flags["threads"])
    set_flags({k: v for k, v in flags.items() if k != "threads"})


_PRISTINE: dict[str, Any] = {}  # the worker's flags before its first evaluation


def evaluate(workload, candidates: dict[str, dict[str, dict]], *, device: str = "cpu", tolerance: float = 2e-2,
             target_s: float = 2.0, warmup_s: float = 3.0, prune_above: float | None = None,
             max_memory_mib: float | None = None) -> dict[str, Any]:
    """Evaluate each candidate ({name: {knob: {field: value}}}) against the baseline.

    Returns {"baseline": timing, "candidates": {name: result}}; a result's status is `ok`,
    `rejected` (accuracy, or peak memory over `max_memory_mib`), `failed` (raised while
    building or running) or `pruned` (a quick look said it is more than `prune_above` x the
    baseline's latency). The quick look's samples count towards the full measurement when the
    candidate is not pruned. Model, inputs and test data (targets too) go to `device`; each
    result's `trial_attrs` carry its peak memory (see `PeakMemory`). On `meta` it is a
    shape-only dry run: placement and shapes are checked, accuracy is not, timings mean nothing.
    """

    if not _PRISTINE:
        _PRISTINE.update(_flags())
    _restore_flags(_PRISTINE)  # whatever the previous candidate's build changed
    dynamo_reset()  # compiled graphs of earlier candidates: memory, and recompile limits
    try:
        ref = reference_for(workload, device)
        return _evaluate(ref, workload, candidates, device=device, tolerance=tolerance, target_s=target_s,
                         warmup_s=warmup_s, prune_above=prune_above, max_memory_mib=max_memory_mib)
    finally:
        _restore_flags(_PRISTINE)


def _evaluate(ref: _Reference, workload, candidates: dict[str, dict[str, dict]], *, device: str, tolerance: float,
              target_s: float, warmup_s: float, prune_above: float | None,
              max_memory_mib: float | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    runners = {BASELINE: ref.baseline}
    hopeless = None if prune_above is None or is_meta(device) else HOPELESS * prune_above
    for name, values in candidates.items():
        results[name], runner = _build_checked(ref, workload, values, device=device, tolerance=tolerance,
                                               hopeless=hopeless, prune_above=prune_above,
                                               max_memory_mib=max_memory_mib)
        if runner is not None:
            runners[name] = runner
    t0 = time.perf_counter()
    _warm_runners(ref, runners, results, device=device, warmup_s=warmup_s, hopeless=hopeless, prune_above=prune_above)
    if len(runners) == 1 and candidates:  # no candidate to time (failed, rejected, given up): the baseline's pace
        return {"baseline": Timing([ref.baseline_ms]).to_dict(), "candidates": results,
                "measure_s": time.perf_counter() - t0}
    timings: dict[str, Timing] | None = None
    if prune_above is not None and len(runners) == 2:
        quick_s = min(0.5, target_s / 4)
        timings = measure_interleaved(runners, device, min_rounds=5, target_s=quick_s, warmup_s=0)
        name = next(n for n in runners if n != BASELINE)
        ratio = timings[name].median / timings[BASELINE].median
        if ratio > prune_above:
            results[name].update(_pruned(ratio, prune_above, f"quick look: {1 / ratio:.2f}x speed-up"),
                                 timing=timings[name].to_dict())
            return {"baseline": timings[BASELINE].to_dict(), "candidates": results}
        target_s = max(target_s - quick_s, 0.0)
        if timings[BASELINE].busy:  # taken while the machine was busy: the rounds below start afresh
            timings = None
    # at least 10 rounds in all, counting the quick look's (measured the same way: its samples stay)
    more = measure_interleaved(runners, device, target_s=target_s, warmup_s=0, min_rounds=10, initial=timings,
                               settle=SETTLE_REL, reference=BASELINE, busy_wait_s=TRIAL_BUSY_WAIT_S)
    for name, t in more.items():
        if name == BASELINE:
            continue
        r = t.median / more[BASELINE].median
        results[name].update(timing=t.to_dict(), ratio=r, speedup=1 / r)
    return {"baseline": more[BASELINE].to_dict(), "candidates": results,
            "measure_s": time.perf_counter() - t0, "test_batches": len(ref.test)}


def _build_checked(ref: _Reference, workload, values: dict[str, dict], *, device: str, tolerance: float,
                   hopeless: float | None, prune_above: float | None,
                   max_memory_mib: float | None) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """Build one candidate and check it on the test data: (its result so far, its runner, or None
    when it failed, was rejected or given up)."""

    res: dict[str, Any] = {"knobs": values}
    try:
        clear_dynamo_counters()
        with PeakMemory(device) as mem:  # its build, its weights and its calls on the test data
            cand = build_candidate(ref, values)
            res["build_s"] = cand.build_seconds
            outs: list = []
            pace = Pace(hopeless)  # each test call's time over the baseline's on that batch; compiles set aside
            for (x, _), base_ms in zip(ref.test, ref.test_ms):
                pace.time(lambda x=x: outs.append(cand(*x)), device, scale=max(base_ms, 1e-6))
        res["compile"] = {**compile_stats(), "compiling_calls": pace.compiling_calls}
        res["trial_attrs"] = {**memory_attrs(mem, ref.memory), **build_report(cand)}
        if is_meta(device):
            res.update(status="ok", note="meta device: shape-only dry run, accuracy not checked")
            return res, (lambda c=cand: c(*ref.inputs))
        acc = compare_outputs(outs, ref.refs, tolerance=tolerance, metric=workload.metric,
                              targets=[y for _, y in ref.test])
        res["accuracy"] = acc.to_dict()
        over = memory_over(mem, max_memory_mib, device)
        if not acc.ok or over:
            res.update(status="rejected", reason=acc.reason if not acc.ok else over)
            return res, None
        res["status"] = "ok"
        return res, (lambda c=cand: c(*ref.inputs))
    except TooSlow as slow:  # a constraint outranks a pace: --max-memory, then a wrong answer seen already
        over = memory_over(mem, max_memory_mib, device)
        n = len(outs)  # the test batches it ran before it was given up (an fp16 overflow shows on the first)
        acc = compare_outputs(outs, ref.refs[:n], tolerance=tolerance, metric=workload.metric,
                              targets=[y for _, y in ref.test[:n]]) if n and not over else None
        if acc is not None and not acc.ok:
            res.update(status="rejected", reason=acc.reason, accuracy=acc.to_dict())
        else:
            res.update(dict(status="rejected", reason=over) if over else _too_slow(slow.value, prune_above))
        res["trial_attrs"] = memory_attrs(mem, ref.memory)
    except Exception as exc:  # noqa: BLE001 - a candidate failing is a result, not a crash
        res.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                   traceback=traceback.format_exc()[-4000:])
    return res, None


def _warm_runners(ref: _Reference, runners: dict[str, Callable[[], Any]], results: dict[str, Any], *, device: str,
                  warmup_s: float, hopeless: float | None, prune_above: float | None) -> None:
    """Warm each runner once (an eager baseline this worker warmed before needs only a few calls);
    a candidate whose calls are hopelessly slow is given up (and its runner dropped). A call that
    compiled is never a slow call: it is counted in the candidate's `compile` figures instead."""
    warm_up(ref.baseline, device, max_s=WARM_BASELINE_S if ref.warmed else warmup_s)
    ref.warmed = True
    for name in list(runners)[1:]:
        pace = Pace(None if hopeless is None else hopeless * ref.baseline_ms)
        try:
            warm_up(runners[name], device, max_s=warmup_s, pace=pace)
        except TooSlow as slow:
            results[name].update(_too_slow(slow.value / ref.baseline_ms, prune_above))
            del runners[name]
        if "compile" in results[name]:
            results[name]["compile"]["compiling_calls"] += pace.compiling_calls


def _too_slow(ratio: float, prune_above: float | None) -> dict[str, Any]:
    return _pruned(ratio, prune_above, f"two calls in a row ran {ratio:.3g}x the baseline's time")


def _pruned(ratio: float, prune_above: float | None, what: str) -> dict[str, Any]:
    """A result pruned as far from the best so far (`ratio`: its time over the baseline's)."""
    return {"status": "pruned", "ratio": ratio, "speedup": 1 / ratio,
            "reason": f"{what}, far from the best so far ({1 / (prune_above or 1):.2f}x would be needed to continue)"}


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
