"""`autotiacc verify`: re-measure a saved plan on the machine at hand and flag drift.

Meant for CI of a serving image: the plan is re-measured against the eager fp32 baseline by the
method of the tune's final re-measurement, so the figure means the same thing as the recorded
one: the plan and the baseline each alone in its own process, timed in windows taken in turns
(a window times one shape, or, for a plan tuned on traffic, whole rounds of its mix), and
compared with what the plan recorded: hardware/software fingerprint, accuracy, speed-up, and
the artifact's hash when the plan names one.

Speed drift is judged with the noise, not against a bare number: the plan fails when its
windows are slower *beyond noise* (Mann-Whitney U over the windows) than the recorded
speed-up, less the allowed `tolerance`, predicts from the baseline's windows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import limits
from ..errors import PlanMismatchError, UserInputError
from ..machine_load import unreliable_text

DEFAULT_SPEED_TOLERANCE = 0.25  # relative drop of the recorded speed-up tolerated before "drift"
DEFAULT_MEASURE_S = 3.0


@dataclass
class VerifyResult:
    """`ok` is False when any `problems` were found; `lines` describe what was measured."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)


def _workload_for(plan, model_file: str | Path, timeout_s: float, device: str):
    """The model file, its contract checked in a child (its exits and hangs are errors)."""
    from .workload import load_workload

    wl = plan.workload or {}
    shapes = ["x".join(str(d) for d in s) for s in wl.get("input_shapes") or []]
    is_saved = Path(model_file).suffix != ".py"
    return load_workload(model_file, batch_size=wl.get("batch_size"),
                         input_shapes=shapes if is_saved else None,
                         input_dtypes=wl.get("input_dtypes") if is_saved else None,
                         timeout=timeout_s, limit="verify's limit", device=device,
                         tolerance=plan.tolerance if plan.tolerance is not None else 2e-2)


def _check_artifact(plan, plan_dir: Path, workload, timeout_s: float) -> tuple[list[str], str | None]:
    """The artifact the plan names: present, hash as recorded, and its outputs on the tuned
    inputs within the plan's tolerance of eager fp32. Returns (problems, a line of findings).
    Loading and running it (native code, the user's model) happen in a child under `timeout_s`."""
    from ..engine.workers import run_isolated
    from .artifacts import files_problem

    entry = plan.extra.get("artifact")
    if not entry or "file" not in entry:
        return [], None
    path = plan_dir / entry["file"]
    if not path.is_file():
        return [f"artifact {entry['file']} named by the plan is missing from {plan_dir}"], None
    problem = files_problem(path, entry)
    if problem:  # the artifact's file, or one beside it that it needs (an OpenVINO IR's .bin)
        return [f"artifact {entry['file']} does not match the plan's sha256 (modified or swapped): {problem}"], None
    tolerance = plan.tolerance if plan.tolerance is not None else 2e-2
    out = run_isolated(_artifact_accuracy, str(plan_dir), workload, entry.get("input_shapes"), tolerance,
                       timeout=timeout_s)
    if not out.ok:
        return [f"artifact {entry['file']} failed to load or run here: {out.reason()}"], None
    if "error" in out.value:
        return [f"artifact {entry['file']} failed to load or run here: {out.value['error']}"], None
    if not out.value["ok"]:
        return [f"artifact {entry['file']}: {out.value['reason']}"], None
    return [], (f"artifact {entry['file']} ({entry.get('format')}): sha256 ok, rel. error {out.value['rel_l2']:.2e} "
                "vs eager fp32")


def _artifact_accuracy(plan_dir: str, workload, shapes, tolerance: float) -> dict[str, Any]:
    """Runs in the child of `_check_artifact`: the artifact against eager fp32 on the test data
    (all branches of the model), as far as it has the shapes the artifact is specialised to."""
    import torch

    from .accuracy import compare_outputs
    from .artifacts import load_artifact

    try:
        artifact = load_artifact(Path(plan_dir) / "plan.json")
        model = workload.build_model()
        batches = [x for x, _ in workload.test_data() if [list(t.shape) for t in x] == shapes]
        batches = batches or [workload.example_inputs()]
        with torch.no_grad():
            acc = compare_outputs([artifact(*x) for x in batches], [model(*x) for x in batches], tolerance=tolerance)
    except Exception as exc:  # noqa: BLE001 - a broken artifact is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"ok": acc.ok, "reason": acc.reason, "rel_l2": acc.rel_l2}


def _costs(plan, workload) -> dict[str, limits.Cost]:
    """What the plan recorded of the baseline and of itself, for the limits of its re-measurement."""
    def ms(figures: dict | None) -> float:
        return float((figures or {}).get("median_ms") or 0.0) / 1e3

    check_s = getattr(workload, "check_s", 0.0)
    return {"baseline": limits.Cost(build_s=check_s, forward_s=ms(plan.baseline)),
            "plan": limits.Cost(build_s=float(plan.compile_s or 0.0), forward_s=ms(plan.best) or ms(plan.baseline))}


def verify_plan(plan_path: str | Path, model_file: str | Path, *, tolerance: float = DEFAULT_SPEED_TOLERANCE,
                measure_s: float = DEFAULT_MEASURE_S, timeout_s: float = 600.0,
                device: str | None = None) -> VerifyResult:
    """Re-measure the plan at `plan_path` for the model in `model_file` here, on `device` (by
    default the plan's own; a CUDA plan in a process without CUDA is a `PlanError`); see the module doc."""
    from ..hardware import fingerprint, fingerprint_differences, fingerprint_id
    from .plan import load_plan
    from .shapes.shape_tuning import shape_tuning_for_plan, values_from_plan

    if not 0 <= tolerance < 1:
        raise UserInputError(f"`--tolerance` got {tolerance!r}: use a fraction in [0, 1), e.g. 0.25 "
                             "(the plan may lose a quarter of its recorded speed-up).")
    if measure_s <= 0:
        raise UserInputError(f"`--measure-s` got {measure_s!r}: use a positive number of seconds, e.g. 3.")
    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    device = plan.target_device(device)  # before any work: a CUDA plan here without CUDA says so
    plan_dir = plan_path if plan_path.is_dir() else plan_path.parent
    workload = _workload_for(plan, model_file, timeout_s, device)
    identity = workload.facts.identity
    recorded_id = (plan.workload or {}).get("param_shapes_sha256")
    if recorded_id and recorded_id != identity["param_shapes_sha256"]:
        raise PlanMismatchError(f"`FILE` {model_file}: its model's parameter shapes differ from the model the plan "
                                f"was tuned for ({(plan.workload or {}).get('name')!r}); give the same model file.")
    problems: list[str] = []
    here = fingerprint(device)
    problems += [f"different hardware/software: {d}" for d in fingerprint_differences(plan.fingerprint, here)]
    artifact_problems, artifact_line = _check_artifact(plan, plan_dir, workload, timeout_s)
    problems += artifact_problems
    recorded = plan.speedup if plan.speedup is not None else 1.0
    rec_acc = (plan.accuracy or {}).get("rel_l2")
    lines = [f"plan: {plan.label} — recorded {recorded:.2f}x over eager fp32"
             + (f", rel. error {rec_acc:.2e}" if rec_acc is not None else "")
             + f", measured on {fingerprint_id(plan.fingerprint) if plan.fingerprint else 'unknown'}",
             f"here: {fingerprint_id(here)}"] + ([artifact_line] if artifact_line else [])
    tol = plan.tolerance if plan.tolerance is not None else 2e-2
    # a plan that keeps the baseline is the model itself in production (`apply` returns it): timed as such
    values = None if plan.keeps_baseline else values_from_plan(plan)
    outcome = shape_tuning_for_plan(plan, workload, measure_s=measure_s).final_measure(
        workload, {"plan": values}, device=device, tolerance=tol, timeout=timeout_s, costs=_costs(plan, workload))
    measured: dict[str, Any] = {"recorded_speedup": recorded, "fingerprint_differences": len(problems)}
    if not outcome.ok:
        problems.append(f"the plan could not be measured here ({outcome.reason()})")
        return VerifyResult(False, problems, lines, measured)
    res = outcome.value["candidates"]["plan"]
    acc = (res.get("accuracy") or {}).get("rel_l2")
    measured.update(rel_l2=acc, ort_session=res.get("ort_session"))  # ORT: the options read back from its session
    if res["status"] != "ok":
        problems.append(f"the plan {res['status']} here: {res.get('reason', '')}")
        return VerifyResult(False, problems, lines, measured)
    _compare(plan, outcome.value, res, VerifyResult(False, problems, lines, measured), tolerance=tolerance,
             timed_model_itself=values is None)
    return VerifyResult(not problems, problems, lines, measured)


def _compare(plan, value: dict[str, Any], res: dict[str, Any], into: VerifyResult, *, tolerance: float,
             timed_model_itself: bool) -> None:
    """The re-measurement (`value`, the plan's result `res`) against what the plan recorded: lines,
    figures and problems added to `into`."""
    from ..measure import Timing, faster_beyond_noise

    lines, problems, measured = into.lines, into.problems, into.measured
    recorded, acc = measured["recorded_speedup"], measured["rel_l2"]
    rec_acc, tol = (plan.accuracy or {}).get("rel_l2"), plan.tolerance if plan.tolerance is not None else 2e-2
    # the figures and the noise test are over the repetitions, one figure per window, as the
    # tune's final decides (per-call samples of one process are not independent repetitions)
    windows = (value.get("alternating") or {}).get("windows_ms") or {}
    base = Timing(windows.get("baseline") or Timing.from_dict(value["baseline"]).samples_ms)
    cand = Timing(windows.get("plan") or Timing.from_dict(res["timing"]).samples_ms)
    speedup = base.median / cand.median
    measured.update(speedup=speedup, baseline_ms=base.median, plan_ms=cand.median, baseline_spread=base.iqr_rel,
                    plan_spread=cand.iqr_rel, n=len(res["timing"]["samples_ms"]), windows=cand.n)
    how = f"medians of {cand.n} windows, the plan and eager each alone in its own process, in turns"
    if res.get("per_shape"):  # a traffic plan: the figures are traffic-weighted over these shapes
        measured["shapes"] = sorted(res["per_shape"])
        how = f"traffic-weighted over {len(res['per_shape'])} shapes; {how}"
    lines.append(f"measured here: {speedup:.2f}x (baseline {base.median:.3f} ms ±{base.iqr_rel:.0%}, "
                 f"plan {cand.median:.3f} ms ±{cand.iqr_rel:.0%}; {how})"
                 + (f", rel. error {acc:.2e}" if acc is not None else ""))
    if timed_model_itself:
        lines.append("the plan keeps the baseline: `apply` returns the model itself, and that is what was timed.")
    verdict = res.get("reliability") or {}
    measured.update(reliable=verdict.get("reliable"), reliability=verdict or None)
    if unreliable_text(verdict):
        lines.append(f"measured here: {unreliable_text(verdict)}")
    if rec_acc is not None and acc is not None and acc > max(2 * rec_acc, rec_acc + 0.1 * tol):
        problems.append(f"accuracy changed: rel. error {acc:.2e} here vs {rec_acc:.2e} recorded")
    floor = recorded * (1 - tolerance)
    # The latency the plan should at worst have here, given the baseline measured beside it.
    expected = Timing([s / floor for s in base.samples_ms])
    if faster_beyond_noise(expected, cand, min_gain=0.0):
        problems.append(f"slower than recorded beyond noise: {speedup:.2f}x here vs {recorded:.2f}x recorded "
                        f"(at least {floor:.2f}x expected with --tolerance {tolerance})")
    elif not plan.fell_back and not faster_beyond_noise(cand, base):
        lines.append("note: within tolerance, but not faster than the baseline beyond noise here.")
