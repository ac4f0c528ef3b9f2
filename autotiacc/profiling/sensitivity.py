"""The per-layer sensitivity pass: which precision groups can be lowered, and in what.

A group is a submodule path from the profile (`groups.candidate_groups`). Lowering
wraps it in a `PrecisionRegion` (autotiacc.knobs.precision_groups, where the precision knob
applies it too).

`analyse_sensitivity` runs before the search (in an isolated process): it lowers one group at
a time in each type, and records the output error and whether anything became inf/NaN. The
search then offers each group only the types it survived, ranked by time share per error;
a short interleaved look at each survivor's speed picks one of the search's starting points.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..knobs.precision import STATIC_INT8
from ..knobs.precision_groups import LOWERED_MODES, apply_group_precision
from .schema import PARTIAL_WHY
from ..torch_compat import tree_flatten

ANALYSED_MODES = (*LOWERED_MODES, STATIC_INT8)  # int8_static: checked per group, not sampled per group


def modes_for(group: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """The modes worth checking on `group`: the allowed ones, dynamic int8 only for a Linear."""
    allowed = set(allowed)
    return [m for m in ANALYSED_MODES if m in allowed and (m != "int8_dynamic" or group.get("linear"))]


def _finite(obj: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tree_flatten(obj)[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclass(frozen=True)
class Checks:
    """How the pass judges a lowered group, given by the layer that owns accuracy and engines:
    `compare(outputs, references, tolerance=)` -> an object with ok, rel_l2 and reason (the
    accuracy guard's comparison); `static_int8(model, path, test, refs, tolerance)` -> the
    sensitivity entry of a group quantized alone by an engine's static quantizer."""

    compare: Callable[..., Any]
    static_int8: Callable[..., dict[str, Any]]


def analysis_order(modes: Iterable[str], device: str) -> list[str]:
    """The order the modes are analysed in, one mode over every group before the next, so a cut
    leaves every group with the modes analysed first: those this device runs natively first,
    and on a CPU int8_static before them: its check is a quantization pass and a few ONNX Runtime
    forwards (no slow kernels), and it decides which groups the int8 candidates, often a CPU's
    fastest, keep in fp32."""
    from ..device import is_cuda
    from ..native_precision import native_first, native_types_here

    ordered = [m for m in ANALYSED_MODES if m in set(modes)]
    if not is_cuda(device):
        ordered.sort(key=lambda m: m != STATIC_INT8)
    return native_first(ordered, native_types_here(device))


def analyse_sensitivity(workload, groups: list[dict[str, Any]], *, modes: list[str], tolerance: float, checks: Checks,
                        device: str = "cpu", time_limit_s: float | None = None, deadline: float | None = None,
                        model: Any = None, done: list[dict[str, Any]] | None = None,
                        progress: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Lower one group at a time in each mode; return the groups with a `sensitivity` entry
    per mode ({rel_l2, finite, ok, reason, quick_speedup}), `allowed` modes and a `score` (time
    share per unit of the smallest allowed error; 0 when nothing is allowed), best score first.

    Runs the model on the workload's test data; meant to run inside `run_isolated`. Steps, one
    mode at a time (`analysis_order`): the check of that mode on every group (accuracy, overflow,
    judged by `checks`), then a quick look at the speed of each group that passed. `done`: the
    entries of an earlier, partial analysis (what they hold is kept, not redone). The analysis
    stops before a step that would end past `deadline` (`time.time()`; or `time_limit_s` from
    now), predicting each step from the last one of its kind; what is left is named in `skipped`
    (see `finish_sensitivity`). `progress` gets the entries before the first step and after each
    one, so a process killed at its cap still leaves what it finished.
    """
    import time

    if time_limit_s is not None:
        deadline = time.time() + time_limit_s if deadline is None else min(deadline, time.time() + time_limit_s)
    entries = {g["path"]: dict(g, sensitivity={}, allowed=[]) for g in groups}
    for old in done or []:
        if old.get("path") in entries:
            entries[old["path"]]["sensitivity"] = copy.deepcopy(old.get("sensitivity") or {})
    todo = _steps(entries, modes, device)
    first = next(todo, None)
    if first is None:
        return finish_sensitivity(list(entries.values()), modes, None)
    if progress is not None:  # what there is before the first step (killed in it: the profile stays)
        progress(finish_sensitivity(list(entries.values()), modes, PARTIAL_WHY))
    run = _Run(workload, model, device, tolerance, checks)
    cut = run.steps(entries, itertools.chain([first], todo), deadline,
                    lambda: progress and progress(finish_sensitivity(list(entries.values()), modes, PARTIAL_WHY)))
    return finish_sensitivity(list(entries.values()), modes, PARTIAL_WHY if cut else None)


def _steps(entries: dict[str, dict[str, Any]], modes: list[str], device: str):
    """(mode, path, "check" | "look") steps left, lazily: which groups get a look depends on their check."""
    for mode in analysis_order(modes, device):
        yield from ((mode, p, "check") for p, e in entries.items()
                    if mode in modes_for(e, modes) and mode not in e["sensitivity"])
        yield from ((mode, p, "look") for p, e in entries.items() if _look_left(e["sensitivity"].get(mode)))


class _Run:
    """The model, the test data and its fp32 references the steps of one analysis share."""

    def __init__(self, workload, model: Any, device: str, tolerance: float, checks: Checks) -> None:
        import torch

        from ..device import to_device

        self.device, self.tolerance, self.checks = device, tolerance, checks
        self.model = to_device(model if model is not None else workload.build_model(), device)
        self.test = to_device(list(workload.test_data()), device)
        with torch.no_grad():
            self.refs, self.ref_ms = _run_timed(self.model, self.test, device, stop_on_overflow=False)
        self.inputs = to_device(workload.example_inputs(), device)

    def steps(self, entries: dict[str, dict[str, Any]], todo, deadline: float | None, after: Callable[[], Any]) -> bool:
        """Runs the steps until one would end past `deadline`; True when it stopped there."""
        import time

        last: dict[tuple[str, str], float] = {}  # seconds of the last step per (mode, kind): fp16 on a CPU costs far more
        for mode, path, kind in todo:
            guess = last.get((mode, kind), max((v for (m, k), v in last.items() if k == kind), default=0.0))
            if deadline is not None and time.time() + guess > deadline:
                return True
            t0 = time.perf_counter()
            sens = entries[path]["sensitivity"]
            if kind == "check":
                slow = any(_far_slower(e["sensitivity"].get(mode)) for e in entries.values())
                sens[mode] = self.check(path, mode, slow)
            else:
                lowered = _lowered(self.model, path, mode, self.device)
                sens[mode]["quick_speedup"] = _quick_speedup(self.model, lowered, self.inputs, self.device)
            last[(mode, kind)] = time.perf_counter() - t0
            after()
        return False

    def check(self, path: str, mode: str, slow_elsewhere: bool) -> dict[str, Any]:
        if mode == STATIC_INT8:  # an engine's quantizer, not a PyTorch region
            return self.checks.static_int8(self.model, path, self.test, self.refs, self.tolerance)
        return _try_mode(self.model, path, mode, self.test, self.refs, self.tolerance, self.device,
                         self.checks.compare, self.ref_ms, slow_elsewhere)


def _look_left(result: dict[str, Any] | None) -> bool:
    """A mode that passed its check and has no speed hint yet."""
    return bool(result and result.get("ok") and "quick_speedup" not in result)


def _far_slower(result: dict[str, Any] | None) -> bool:
    return bool(result) and str(result.get("reason", "")).startswith("far slower")


def finish_sensitivity(entries: list[dict[str, Any]], modes: list[str], why: str | None) -> list[dict[str, Any]]:
    """Allowed modes, score and (where steps are left) `skipped` for each entry; best score
    first. A group is offered to the search with the modes checked so far: unchecked modes are
    not offered, since only the check tells an overflow from a safe mode; a mode whose quick look
    is left is offered, without its speed hint."""
    out = []
    for e in entries:
        e = {k: v for k, v in e.items() if k != "skipped"}
        sens = e.get("sensitivity") or {}
        e["allowed"] = [m for m in LOWERED_MODES if m in sens and sens[m].get("ok")]
        errors = [sens[m]["rel_l2"] for m in e["allowed"]]
        e["score"] = e.get("inclusive_share", 0.0) / max(min(errors), 1e-6) if errors else 0.0
        left = [m for m in modes_for(e, modes) if m not in sens]
        looks = [m for m in e["allowed"] if _look_left(sens[m])]
        if left or looks:
            what = ", ".join(([f"checks of {', '.join(left)}"] if left else [])
                             + ([f"quick looks at {', '.join(looks)}"] if looks else []))
            e["skipped"] = f"{'partly' if sens else 'not'} analysed ({what} left): {why or 'the analysis was stopped'}"
        out.append(e)
    out.sort(key=lambda g: -g["score"])
    return out


QUICK_ROUNDS = 4


def _quick_speedup(model, lowered, inputs, device: str, rounds: int = QUICK_ROUNDS) -> float:
    """A short interleaved look (A B, B A, ...: drift hits both alike) at what lowering this
    group alone gains; a hint for where to start the search, never a figure in the plan. One
    warm-up call each: fp32 and this mode's kernels have just run the test batches (the
    harness's default warm-up and minimum rounds had taken 16 of a step's 20 forwards, 4.8 of
    5.9 s at load 4 here)."""
    import torch

    from ..measure import measure_interleaved

    fns = {"fp32": lambda: model(*inputs), "lowered": lambda: lowered(*inputs)}
    with torch.no_grad():
        t = measure_interleaved(fns, device, min_rounds=rounds, max_rounds=rounds, target_s=0.0, warmup_s=0.0,
                                min_warmup=1)
    return t["fp32"].median / t["lowered"].median


SLOW_LOOK = 1.5  # a lowered group this much slower than fp32 on every test batch gets no quick look
# A lowered group that makes the first two test batches this much slower than the fastest fp32
# one (and 0.1 s more) cannot pay: fp16 convolutions on this CPU ran 8-90x fp32 and took 7-9 s each to
# analyse on 4 batches (fp16 Linear layers ran 0.6-0.7x: analysed as before).
SLOW_EXCLUDE = 5.0


def _run_timed(fn, test, device: str, *, stop_on_overflow: bool = True, give_up_ms: float | None = None,
               give_up_after: int = 2) -> tuple[list[Any], list[float]]:
    """Outputs and ms of `fn` on each test batch; stops after the first non-finite output, and
    after the first `give_up_after` batches when each was slower than `give_up_ms`."""
    from ..measure import time_once

    outs, ms = [], []
    for x, _ in test:
        box: list[Any] = []
        ms.append(time_once(lambda box=box, x=x: box.append(fn(*x)), device))
        outs.append(box[0])
        if stop_on_overflow and not _finite(box[0]):
            break  # an overflow: the mode fails whatever the other batches give
        if give_up_ms is not None and len(ms) == give_up_after and min(ms) > give_up_ms:
            break  # two batches by default: one may be a cold call, or another process's turn
    return outs, ms


def _lowered(model, path: str, mode: str, device: str):
    """A copy of `model` with the group at `path` lowered to `mode`."""
    return apply_group_precision(copy.deepcopy(model), [(path, mode)], device)


def _try_mode(model, path, mode, test, refs, tolerance, device, compare_outputs,
              ref_ms: list[float] | None = None, slow_elsewhere: bool = False) -> dict[str, Any]:
    """The check of one group in one mode: accuracy and overflow on the test batches (its quick
    look is a later step). `slow_elsewhere`: this mode was far slower on another group, so one
    slow test batch is enough to give up here."""
    import torch

    seen = {"group_finite": True}
    try:
        lowered = _lowered(model, path, mode, device)
        region = lowered.get_submodule(path)
        # the group's own output: an overflow here can be hidden downstream (e.g. by a clamp)
        region.inner.register_forward_hook(lambda m, a, o: seen.__setitem__(
            "group_finite", seen["group_finite"] and _finite(o)))
        fastest = min(ref_ms) if ref_ms else None
        give_up = max(SLOW_EXCLUDE * fastest, fastest + 100.0) if fastest else None
        with torch.no_grad():
            outs, ms = _run_timed(lowered, test, device, give_up_ms=give_up, give_up_after=1 if slow_elsewhere else 2)
    except Exception as exc:  # noqa: BLE001 - a mode that cannot run on this group is excluded
        return {"ok": False, "finite": False, "rel_l2": math.inf,
                "reason": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    finite = seen["group_finite"] and all(_finite(o) for o in outs)
    acc = compare_outputs(outs, refs[:len(outs)], tolerance=tolerance)
    if not finite:
        return {"ok": False, "finite": False, "rel_l2": acc.rel_l2 if math.isfinite(acc.rel_l2) else math.inf,
                "reason": "overflow: inf/NaN in " + ("the group's output" if not seen["group_finite"] else "the model output")}
    if len(outs) < len(test):  # given up early: far too slow to be worth a search parameter
        return {"ok": False, "finite": True, "rel_l2": acc.rel_l2, "quick_speedup": fastest / min(ms),
                "reason": f"far slower: {min(ms) / fastest:.0f}x the fp32 forward's time on "
                          + ("a test batch, as on another group" if len(ms) == 1 else f"{len(ms)} test batches")
                          + ", so it cannot pay here (not analysed further, not offered)"}
    res = {"ok": acc.ok, "finite": True, "rel_l2": acc.rel_l2, "reason": acc.reason}
    # the test batches already timed both: where the lowered model was far slower on every one,
    # that ratio is the hint and the interleaved look is not worth its time
    best = max((r / m for r, m in zip(ref_ms or [], ms) if m > 0), default=None)
    if acc.ok and best is not None and best * SLOW_LOOK < 1:
        res["quick_speedup"] = best
    return res
