"""The inference task on the engine: the knob registry and a YAML strategy as the space,
candidates built and timed interleaved with the eager baseline in an isolated worker, the
plan (`Plan`) at the end. The search loop itself is `engine.loop.Search`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..engine import limits
from ..engine.fidelity import measured_env
from ..engine.loop import SPAWN_OVERHEAD_S, Search, SearchResult
from ..engine.options import MIN_BUDGET_S, RunOptions, check_memory_limit, refuse_baseline_over_limit
from ..profiling.cache import cached_profile
from ..engine.space import as_values, config_key, sample, seed_allowed, seed_params, strategy_for
from ..engine.task import Candidate, Decision, Direction, FinalMeasure, Task, TrialResult
from ..engine.workers import WorkerPool, worker_env
from ..engines.cache import shared_builds
from ..errors import BudgetError, UserInputError
from ..hardware import fingerprint as machine_fingerprint
from ..knobs import SearchContext, all_knobs, configs_from_params, describe
from ..knobs.int8 import torchao_available
from ..knobs.precision_groups import is_group_param
from ..machine_load import load_attrs
from ..measure import Timing
from .accuracy import DEFAULT_TOLERANCE
from .plan import Plan
from .final_costs import final_costs_of, pending_stand_in
from .plan_choice import fill_plan
from .shapes.shape_tuning import FINAL_WARMUP_S, ShapeTuning, shape_tuning_for
from .twins import TWIN, merge_twins, twin_trials, with_twins
from .workload import ModelFacts, Workload

__all__ = ["TuneOptions", "TuneResult", "InferenceTask", "tune", "MIN_BUDGET_S", "SPAWN_OVERHEAD_S"]

STUDY_NAME = "autotiacc"
PROFILE_WRITE_S = 0.3  # of the profile's share, kept for writing profile.json and the cache
Progress = Callable[[dict[str, Any]], None]
TuneResult = SearchResult


@dataclass
class TuneOptions(RunOptions):
    """Inference: the engine's options plus the level, strategy, tolerance and traffic."""

    level: int = 1
    strategy: str = "inference-latency"
    tolerance: float | None = None
    traffic_file: str | None = None  # dynamic shapes: CSV/JSON traffic mix (else model.py traffic())
    p99_ms: float | None = None  # dynamic shapes: p99 latency budget over the traffic mix
    max_memory_mib: float | None = None  # a candidate peaking above it (MiB) is rejected with the figure

    def __post_init__(self) -> None:
        if self.level not in (0, 1, 2):
            raise UserInputError(f"`--level` got {self.level!r}: use 0 (no precision change), 1 (default) or 2 (aggressive).")
        if self.tolerance is not None and not self.tolerance > 0:
            raise UserInputError(f"`--tolerance` got {self.tolerance!r}: use a positive number, e.g. 0.01.")
        super().__post_init__()

    @property
    def effective_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.level]


def search_context(facts: ModelFacts, device: str, level: int) -> SearchContext:
    from ..hardware import usable_cores

    try:
        import onnxruntime  # noqa: F401

        ort = True
    except ImportError:
        ort = False
    return SearchContext(device=device, level=level, cores=usable_cores(), has_conv=facts.has_conv, onnxruntime=ort,
                         torchao=torchao_available(), has_linear=facts.has_linear, module_names=facts.module_names)


def stage_one(strategy, ctx: SearchContext, native) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Optuna params of stage 1, the seeds moved to its end for this hardware with why).

    The profile's diagnosis (in `ctx.extras`) puts the seeds that pay for this model first;
    strategy entries pin every per-layer group to fp32; then the per-layer starting points.
    Seeds that compute in a type `native` (a `NativeTypes`) has no units for go last: bf16 on a
    CPU without avx512_bf16/amx_bf16 ran 60x slower than eager on resnet50."""
    from ..native_precision import by_hardware
    from ..profiling.diagnosis import order_seeds

    entries = order_seeds(strategy.seeds(cuda=ctx.cuda), ctx.extras.get("diagnosis"))
    fp32 = ctx.extras.get("precision_fp32", {})
    items = [({**fp32, **seed_params(e, all_knobs())}, describe(configs_from_params(e))) for e in entries
             if seed_allowed(e, all_knobs(), strategy, ctx)]
    baseline = seed_params({}, all_knobs())
    items += [({**baseline, **p}, "per-layer " + ", ".join(f"{k}={m}" for k, m in p.items() if m != "fp32"))
              for p in ctx.extras.get("precision_enqueue", [])]
    ordered, moved = by_hardware(items, native, lambda it: _modes(it[0]))
    return [p for p, _ in ordered], [{"seed": label, "why": why} for (_, label), why in moved]


def _modes(params: dict[str, Any]) -> list[str]:
    """The precision modes a stage-1 seed's Optuna params compute in: global and per layer."""
    return [params.get("mode", "fp32")] + [m for k, m in params.items() if is_group_param(k)]


def family_of(values: dict[str, Any]) -> str:
    """Backend (its compile mode, CUDA graphs), precision (its groups), layout and shapes: the
    final re-measures one of each. Runtime settings (threads, inference_mode, cudnn.benchmark)
    and compile's freezing are left to the search's ranking: on 2 cores, three bf16 + compile
    trials differing only in those took three of a final's five fresh processes."""
    ex, prec = values.get("execution", {}), values.get("precision", {})
    return repr((ex.get("backend", "eager"), ex.get("compile_mode"), ex.get("cuda_graphs"), prec.get("mode", "fp32"),
                 prec.get("groups"), values.get("layout", {}).get("channels_last"), values.get("shapes")))


class InferenceTask(Task):
    """A model.py (or TorchScript/.pt2) at one input shape, or over a traffic mix."""

    mode = "infer"
    direction: Direction = "minimize"  # candidate latency / baseline latency

    def __init__(self, workload: Workload, options: TuneOptions) -> None:
        self.workload, self.options = workload, options
        self.t_start = options.started if options.started is not None else time.monotonic()
        self.strategy = strategy_for("inference", options.strategy)
        self.strategy_name = self.strategy.name
        self.final_top_k = self.strategy.final_top_k
        self.baseline_label = describe(configs_from_params({}))  # studies from before the `baseline` flag
        self.baseline_values = as_values(configs_from_params({}))
        self.plan_extra: dict[str, Any] = {}
        # The shape dimension: one shape, or buckets over a traffic mix (see shape_tuning's hooks).
        self.shape_tuning = shape_tuning_for(workload, traffic_file=options.traffic_file, p99_ms=options.p99_ms,
                                             strategy=self.strategy)
        if options.max_memory_mib is not None and isinstance(self.shape_tuning, ShapeTuning):
            raise UserInputError("`--max-memory` is measured per candidate at one input shape; drop it, or tune "
                                 "without a traffic mix.")

    # -- set-up ------------------------------------------------------------------------------
    def validate(self, left_s: float) -> None:
        facts = self.workload.validate(timeout=max(1.0, left_s), budget_s=self.options.budget_s,
                                       device=self.options.device, tolerance=self.options.effective_tolerance)
        check_memory_limit(self.options.max_memory_mib, facts.baseline_peak_mib, device=self.options.device,
                           source=facts.memory_source, what="its build and its calls on the test data")
        self.ctx = search_context(facts, self.options.device, self.options.level)
        self.ctx.extras["traffic"] = isinstance(self.shape_tuning, ShapeTuning)  # int8_static calibrates one shape
        self._identity = facts.identity
        self._fingerprint = machine_fingerprint(self.options.device)
        self.ctx.extras["cpu_flags"] = tuple(self._fingerprint.get("cpu_flags") or ())  # the units knobs may need
        self.pool: WorkerPool | None = None

    def prepare(self, run_dir, left_s: float) -> float:
        """Profile + per-layer sensitivity into profile.json, reused across runs of the same
        workload and machine (cached); extras for the precision knob. Returns its wall seconds.

        It takes at most `profile_share` of the budget (10 %), the first profile of a workload
        on a machine too: one cut at its share is cached as partial, and each later run spends
        its own share completing it (see profiling.cache); once complete, later runs
        spend nothing on it."""
        from ..profiling.schema import SCHEMA_VERSION
        from ..version import __version__
        from .layer_choice import plan_summary
        from .layer_precision import prepare_search

        self.run_dir = run_dir
        t0 = time.monotonic()
        share = min(self.strategy.profile_share * self.options.budget_s, left_s)
        with cached_profile(run_dir.path, self._identity, self._fingerprint,
                            key_extra=[self.options.level, self.strategy.name, self.options.effective_tolerance,
                                       SCHEMA_VERSION, __version__],
                            resume=self.options.resume) as cached:
            # what is left of the share once the cache is read; a moment kept for writing the result
            timeout = max(0.0, share - (time.monotonic() - t0) - PROFILE_WRITE_S)
            extras = prepare_search(self.workload, run_dir.path, device=self.options.device, level=self.options.level,
                                    strategy=self.strategy, tolerance=self.options.effective_tolerance,
                                    timeout=timeout, resume=cached.reuse, start=cached.start,
                                    min_s=limits.profile_min_s(self.workload.check_s))
        self.ctx.extras.update(extras)
        self.plan_extra = {"layer_precision": plan_summary(run_dir.path), "seed_order": self._seed_order(),
                           "guard_data": self.workload.facts.guard_data}  # which data the accuracy guard used
        self.knobs = [k for k in all_knobs() if k.applies(self.ctx) or k.name in ("execution", "precision", "runtime")]
        return time.monotonic() - t0

    def _seed_order(self) -> dict[str, Any]:
        """run.json's and the plan's record of what the hardware did to stage 1."""
        from ..native_precision import native_types

        return native_types(self._fingerprint).seed_record(self.stage_one()[1])

    def identity(self) -> dict[str, Any]:
        return self._identity

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def study_attrs(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "level": self.options.level}

    def opened(self, study) -> None:
        self.study = study  # its baseline trial scales the limits of the others

    def run_record(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "level": self.options.level,
                "tolerance": self.options.effective_tolerance,
                **{k: self.plan_extra.get(k) for k in ("seed_order", "guard_data")}}

    def seeds(self) -> list[dict[str, Any]]:
        return self.stage_one()[0]

    def stage_one(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from ..native_precision import native_types

        return stage_one(self.strategy, self.ctx, native_types(self._fingerprint))

    # -- one trial ---------------------------------------------------------------------------
    def propose(self, trial) -> Candidate:
        configs = configs_from_params(as_values(sample(trial, self.knobs, self.strategy, self.ctx)))
        values = self.shape_tuning.suggest(trial, as_values(configs), self.ctx)
        label = describe(configs) + self.shape_tuning.label(values)
        reason = next((r for k in self.knobs if (r := k.incompatible(configs, self.ctx))), None)
        return Candidate(values=values, label=label, key=config_key(values), is_baseline=values == self.baseline_values,
                         skip=reason)

    def trial_timeout(self, left_s: float, budget_s: float, candidate: Candidate) -> float:
        if candidate.is_baseline:
            return left_s  # the baseline is the one trial every plan needs
        # One slow candidate (a compile on a loaded machine) must not eat the whole budget, nor
        # be stopped sooner than the baseline's own trial could finish (a model with a slow forward)
        base = self._baseline_trial()
        return min(left_s, limits.trial_limit(strategy_limit_s=self.strategy.trial_timeout_s,
                                              share_s=self.strategy.max_trial_share * budget_s,
                                              baseline_trial_s=float(base.user_attrs["wall_s"]) if base else None))

    def _baseline_trial(self):
        """The measured baseline trial of this study, or None."""
        study = getattr(self, "study", None)
        trials = study.get_trials(deepcopy=False) if study is not None else []
        return next((t for t in trials if t.user_attrs.get("baseline") and t.user_attrs.get("status") == "ok"
                     and t.user_attrs.get("wall_s")), None)

    def start_search(self) -> None:
        # One warm worker for the whole search (replaced only after a crash, hang or OOM).
        self.pool = WorkerPool(env=worker_env(self.run_dir.path), log_dir=self.run_dir.path / "trials")

    def end_search(self, study) -> None:
        self.close()  # its cores and memory go to the final, which times every variant in a fresh process
        if not any(t.user_attrs.get("status") not in (None, "duplicate", "skipped") for t in study.trials):
            raise BudgetError(self._too_short("ended before the baseline could be measured"))  # not "no candidate passed"

    def _too_short(self, what: str, trial_s: float | None = None) -> str:
        from ..durations import suggest_budget

        setup = time.monotonic() - self.t_start
        trial_s = trial_s or (self.workload.check_s + FINAL_WARMUP_S + 2 * self.strategy.measure_s)
        final = SPAWN_OVERHEAD_S + 2 * FINAL_WARMUP_S + self.strategy.final_measure_s + 5
        return (f"`--budget` of {self.options.budget_s:.0f}s {what}: setting up took {setup:.0f}s and one trial takes "
                f"about {trial_s:.0f}s here; give --budget {suggest_budget(setup_s=setup, trial_s=trial_s, final_s=final)}"
                " or more.")

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None

    def evaluate(self, trial, candidate: Candidate, *, timeout: float, best_gain: float) -> TrialResult:
        # the baseline is never pruned: a quick look at a tiny model is noise, not "0.47x of itself"
        fn, extra = self.shape_tuning.evaluator(
            measure_s=self.strategy.measure_s,
            prune_above=None if candidate.is_baseline else self.strategy.prune_factor / best_gain)
        if self.options.max_memory_mib is not None:  # one shape only (checked in __init__)
            extra["max_memory_mib"] = self.options.max_memory_mib
        log_path = self.run_dir.trial_log(f"{trial.number:04d}")
        outcome = self.pool.call(
            fn, self.workload, {"candidate": candidate.values}, timeout=timeout, log_path=log_path,
            device=self.options.device, tolerance=self.options.effective_tolerance, **extra)
        attrs: dict[str, Any] = {"wall_s": round(outcome.seconds, 3)}
        if not outcome.ok:
            if outcome.traceback:  # where it raised, or where a hang was stuck: kept in the trial's log
                with open(log_path, "a") as log:
                    log.write(f"\n{outcome.status}: {outcome.error}\n{outcome.traceback}")
            attrs.update(status=outcome.status, reason=outcome.error)
            if outcome.status == "timeout" and timeout < self.strategy.trial_timeout_s:
                attrs["reason"] = (f"stopped after {outcome.seconds:.0f} s, its share of the budget "
                                   f"(max_trial_share={self.strategy.max_trial_share:g}, at least {limits.SLACK:g}x "
                                   "the baseline's trial, or the time left)")
            return TrialResult("fail", attrs=attrs)
        res = outcome.value["candidates"]["candidate"]
        base = Timing.from_dict(outcome.value["baseline"])
        attrs.update(status=res["status"], reason=res.get("reason", ""), build_s=res.get("build_s"),
                     measure_s=outcome.value.get("measure_s"), baseline_ms=base.median, compile=res.get("compile"),
                     rel_l2=(res.get("accuracy") or {}).get("rel_l2"), test_batches=outcome.value.get("test_batches"),
                     **load_attrs(base.load))
        attrs.update(res.get("trial_attrs", {}))  # the shape hook's figures (traffic p99, its timing seconds)
        if "timing" in res:
            cand = Timing.from_dict(res["timing"])
            attrs.update(latency_ms=cand.median, p90_ms=cand.p90, spread=cand.iqr_rel, speedup=res["speedup"])
        state = {"ok": "complete", "pruned": "pruned"}.get(res["status"], "fail")
        return TrialResult(state, res["ratio"] if state == "complete" else None, attrs)

    def check_baseline(self, result: TrialResult, budget_s: float) -> None:
        refuse_baseline_over_limit(result.attrs)  # the up-front check measured less than its trial did
        if result.state != "complete" and result.attrs.get("status") == "timeout":
            wall = result.attrs["wall_s"]
            raise BudgetError(self._too_short(f"is too small to measure the baseline (it ran {wall:.0f}s without "
                                              "finishing)", trial_s=wall * 1.5))

    # -- the end -----------------------------------------------------------------------------
    def final_reserve(self, tops: list, *, pending: bool = False, least: bool = False) -> float:
        """Time kept for the final re-measurement (fresh processes rebuilding the top candidates and
        the baseline, warm-ups, the timing windows; the shape hook's estimate). A `pending` trial
        may join the tops: `final_costs.pending_stand_in`."""
        base = self._baseline_trial()
        if pending and base is not None and len(tops) < self.final_top_k:
            tops = [*tops, pending_stand_in(base, self.workload.check_s)]
        if not tops:  # nothing to re-measure: the plan is written at once
            return 0.0
        # the model check timed a build and a forward in a child, on this machine, at this load
        tops = tops + twin_trials(tops, self.strategy.space("ort"))  # each twin is one more process
        return self.shape_tuning.final_reserve(tops, process_s=self.workload.check_s, least=least)

    def family(self, values: dict[str, Any]) -> Any:
        return family_of(values)

    def final_group(self, values: dict[str, Any]) -> Any:
        # eager and TorchScript run 1.2-1.9x faster in a worker whose allocator has warmed up
        # (experiments/allocator.py), compiled code not at all: the search's ratios are biased
        # by backend, so the final compares the best of each side by side
        return values.get("execution", {}).get("backend", "eager")

    def final_candidates(self, tops: list, trials: list) -> list:
        from .layer_choice import best_full_precision

        return best_full_precision(tops, trials)

    def final(self, tops: list, timeout: float) -> FinalMeasure | str:
        # each finalist, and the twins of options only a process of its own can judge (inference.twins)
        cands = with_twins({f"trial_{t.number}": t.user_attrs["knobs"] for t in tops}, self.strategy.space("ort"))
        costs = final_costs_of(tops, self.workload.check_s)  # a twin costs what its finalist does
        costs.update({n: costs[n.removesuffix(TWIN)] for n in cands if n.endswith(TWIN)})
        # in the tune's environment, in alternating processes; a window (one shape, rounds of a mix) is the shape
        # hook's; a finalist and its twin export their graph once (engines.cache)
        with shared_builds(self.run_dir.path) as builds_env:
            outcome = self.shape_tuning.final_measure(
                self.workload, cands, device=self.options.device, tolerance=self.options.effective_tolerance,
                warmup_s=FINAL_WARMUP_S, env={**worker_env(self.run_dir.path), **builds_env}, timeout=timeout,
                log_path=self.run_dir.trial_log("final"), costs=costs)
        if not outcome.ok:
            return outcome.reason()
        self.final_alternating = outcome.value.get("alternating")
        merged = merge_twins(outcome.value["candidates"], (self.final_alternating or {}).get("windows_ms") or {})
        return FinalMeasure(baseline=Timing.from_dict(outcome.value["baseline"]),
                            candidates={int(n.split("_")[1]): (r["status"], Timing.from_dict(r["timing"])
                                                               if "timing" in r else None, r)
                                        for n, r in merged.items()})

    def make_plan(self, decision: Decision, study) -> Plan:
        trials = study.get_trials(deepcopy=False)
        plan = Plan(knobs=configs_from_params({}), fingerprint=self._fingerprint, workload=self._identity,
                    device=self.options.device, tolerance=self.options.effective_tolerance, level=self.options.level,
                    extra={"strategy": self.strategy.name, "trials": len(trials), "measured_env": measured_env(),
                           **self.plan_extra})
        base_trial = next((t for t in trials if t.user_attrs.get("baseline")
                           and t.user_attrs.get("baseline_ms")), None)
        if base_trial is not None:  # search-time figure, replaced below by the final re-measurement
            plan.baseline = {"median_ms": base_trial.user_attrs["baseline_ms"], "source": "search"}
        fill_plan(plan, decision, trials, shape_tuning=self.shape_tuning,
                  final_alternating=getattr(self, "final_alternating", None))
        return plan


def tune(workload: Workload, options: TuneOptions, progress: Progress | None = None) -> TuneResult:
    """Run one inference tune on the engine."""
    task = InferenceTask(workload, options)
    return Search(task, options, patience=task.strategy.patience, progress=progress).run()
