"""The training task on the engine: registered training knobs and the `training` strategy
YAML as the space; each trial runs in fresh rank processes (`launch.run_ranks`), timed side by
side with the baseline; the winner is re-measured against the baseline in fresh processes
before it becomes a plan. The search loop itself is `engine.loop.Search`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..device import parse_memory
from ..engine.loop import SPAWN_OVERHEAD_S, Search, SearchResult, failure_note
from ..engine.options import RunOptions, check_memory_limit
from ..engine.space import config_key, sample, seeds, strategy_for
from ..engine.task import Candidate, Decision, Direction, FinalMeasure, Task, TrialResult
from ..errors import BudgetError, UserInputError
from ..hardware import fingerprint as machine_fingerprint
from ..knobs.base import all_knobs
from ..machine_load import load_attrs, merge_loads, reliability, unreliable_sentence
from ..measure import Timing
from .config import TrainConfig, train_context
from .launch import run_ranks
from .plan import TrainingPlan
from .trial import train_trial
from .workload import TrainWorkload

STUDY_NAME = "autotiacc-train"
Progress = Callable[[dict[str, Any]], None]

@dataclass
class TrainTuneOptions(RunOptions):
    """Training: the engine's options plus processes, memory limit, loss tolerance, rounds."""

    study_name: str = STUDY_NAME
    nproc: int = 1
    max_memory_mib: float | None = None
    tolerance: float = 0.05  # relative difference of the loss after the guard steps
    strategy: str = "training"
    trial_timeout_s: float | None = None  # default: the strategy's
    rounds: int = 3
    final_rounds: int = 6
    patience: int | None = None  # default: the strategy's
    compile: bool = True

    def __post_init__(self) -> None:
        from ..hardware import usable_cores

        if self.nproc < 1:
            raise UserInputError(f"`--nproc` got {self.nproc}: use 1 or more processes.")
        if not self.tolerance > 0:
            raise UserInputError(f"`--tolerance` got {self.tolerance!r}: use a positive number, e.g. 0.05.")
        super().__post_init__()  # resolves --device (auto too)
        cores = usable_cores()
        if not self.device.startswith("cuda") and self.nproc > cores:  # ranks would queue for cores, timing nothing
            raise UserInputError(f"`--nproc` {self.nproc} is more than the {cores} CPU cores this process may use; "
                                 f"each rank needs a core of its own: use --nproc {cores} or fewer.")
        if self.device.startswith("cuda") and self.nproc > 1:
            import torch

            if self.device != "cuda" or torch.cuda.device_count() < self.nproc:
                raise UserInputError(f"`--nproc` {self.nproc} with `--device` {self.device}: each rank takes its own "
                                     f"GPU (cuda:RANK, NCCL) and {torch.cuda.device_count()} are visible; use --device "
                                     f"cuda with --nproc {torch.cuda.device_count()} or fewer, or --device cpu (gloo).")


TrainTuneResult = SearchResult


class TrainingTask(Task):
    """A train.py: candidates run in fresh rank processes (`launch.run_ranks`), each timed side
    by side with the baseline (num_workers=0, fp32) in the same ranks, its loss curve guarded."""

    mode = "train"
    direction: Direction = "maximize"  # samples/s over the baseline's
    final_top_k = 1
    baseline_label = TrainConfig().label()

    def __init__(self, workload: TrainWorkload, options: TrainTuneOptions) -> None:
        self.workload, self.options = workload, options
        self.strategy = strategy_for("training", options.strategy)
        self.strategy_name = self.strategy.name
        self.patience = options.patience if options.patience is not None else self.strategy.patience
        self.trial_timeout_s = options.trial_timeout_s or self.strategy.trial_timeout_s
        self.knobs = all_knobs("training")
        self.device_decode_note: str | None = None  # whether decode=device is searched; set by validate
        self.seed_order: dict[str, Any] | None = None  # the seeds the hardware moved last; set by validate

    # -- set-up ------------------------------------------------------------------------------
    def validate(self, left_s: float) -> None:
        from ..hardware import usable_cores

        # the check of the training file runs first, in a child, under the budget (module doc of contract.py)
        facts = self.workload.validate(timeout=max(1.0, left_s), limit=f"the {self.options.budget_s:.0f} s --budget",
                                       device=self.options.device, nproc=self.options.nproc)
        check_memory_limit(self.options.max_memory_mib, facts.peak_mib, device=self.options.device,
                           source=facts.memory_source, what="building the model and one training step")
        self.device_decode_note = "searched" if facts.device_decode is None else f"not searched: {facts.device_decode}"
        self.ctx = train_context(cores=usable_cores(), nproc=self.options.nproc, device=self.options.device,
                                 has_conv=facts.has_conv, fused_ok=facts.fused_ok, compile=self.options.compile,
                                 device_decode=facts.device_decode is None)
        self._identity = facts.identity
        self._fingerprint = machine_fingerprint(self.options.device)
        self.seed_order = self._stage_one()[1]

    def prepare(self, run_dir, left_s: float) -> float:
        self.run_dir = run_dir
        self.threads = max(1, self.ctx.cores // self.options.nproc)
        return 0.0

    def identity(self) -> dict[str, Any]:
        return self._identity

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def opened(self, study) -> None:
        self.study = study  # the baseline's loss curve (the guard's reference) lives in it

    def study_attrs(self) -> dict[str, Any]:
        return {"nproc": self.options.nproc}

    def run_record(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "nproc": self.options.nproc, "tolerance": self.options.tolerance,
                "max_memory_mib": self.options.max_memory_mib, "device_decode": self.device_decode_note,
                "seed_order": self.seed_order}

    def seeds(self) -> list[dict[str, Any]]:
        return self._stage_one()[0]

    def _stage_one(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The strategy's seeds, those computing in a type without units here (bf16 on a CPU
        without avx512_bf16/amx_bf16) last; and run.json's record of what moved, and why."""
        from ..native_precision import by_hardware, native_types

        native = native_types(self._fingerprint)
        ordered, moved = by_hardware(seeds(self.strategy, self.knobs, self.ctx), native,
                                     lambda p: [p.get("precision.mode", "fp32")])
        return ordered, native.seed_record([{"seed": TrainConfig.from_flat(p).label(), "why": why} for p, why in moved])

    # -- one trial ---------------------------------------------------------------------------
    def propose(self, trial) -> Candidate:
        config = TrainConfig(**sample(trial, self.knobs, self.strategy, self.ctx))
        return Candidate(values=config.to_list(), label=config.label(), key=config_key(config.flat()),
                         is_baseline=config == TrainConfig())

    def trial_timeout(self, left_s: float, budget_s: float, candidate: Candidate) -> float:
        return min(self.trial_timeout_s, left_s)

    def _reference(self, study) -> list[list[float]] | None:
        return study.user_attrs.get("reference_losses")

    def _launch(self, config: TrainConfig, *, name: str, timeout: float, reference, rounds: int,
                compare_baseline: bool):
        return run_ranks(train_trial, self.options.nproc, self.workload, config.to_list(), timeout=timeout,
                         log_dir=self.run_dir.path / "trials" / name,
                         pid_file=self.run_dir.path / "trials" / f"{name}.pids",
                         reference_losses=reference, tolerance=self.options.tolerance, rounds=rounds,
                         compare_baseline=compare_baseline, max_memory_mib=self.options.max_memory_mib,
                         seed=self.options.seed, threads=self.threads, gloo_timeout_s=max(30.0, timeout),
                         device=self.options.device)

    def evaluate(self, trial, candidate: Candidate, *, timeout: float, best_gain: float) -> TrialResult:
        name = f"{trial.number:04d}"
        config = TrainConfig.from_list(candidate.values)
        reference = self._reference(self.study)
        overall, _ = self._launch(config, name=name, timeout=timeout, rounds=self.options.rounds,
                                  reference=None if candidate.is_baseline else reference,
                                  compare_baseline=not candidate.is_baseline)
        attrs: dict[str, Any] = {"wall_s": round(overall.seconds, 2)}
        if not overall.ok:
            attrs.update(status=overall.status, reason=overall.error)
            if overall.traceback:
                (self.run_dir.path / "trials" / name / "error.txt").write_text(overall.traceback)
            return TrialResult("fail", attrs=attrs)
        ranks = overall.value
        attrs.update(summarize(ranks, reference))
        if attrs["status"] != "ok":
            return TrialResult("fail", attrs=attrs)
        if candidate.is_baseline:
            self.study.set_user_attr("reference_losses", [r["losses"] for r in ranks])
            attrs["speedup"] = 1.0
        return TrialResult("complete", attrs.get("speedup", 1.0), attrs)

    def check_baseline(self, result: TrialResult, budget_s: float) -> None:
        if result.state == "complete":
            return
        reason = result.attrs.get("reason")
        if result.attrs.get("status") == "timeout":
            raise BudgetError(f"the baseline training trial did not finish ({reason}); give a larger `--budget`.")
        raise UserInputError(f"the baseline training trial failed ({reason}), so no candidate can be compared with "
                             "it; fix the training file (the trial logs in the run directory say where).")

    # -- the end -----------------------------------------------------------------------------
    def final_reserve(self, tops: list, *, pending: bool = False, least: bool = False) -> float:
        """Time kept for the final re-measurement (a baseline and the winner, longer windows): a
        top trial's wall time scaled to the final's rounds; with a `pending` trial and no top yet,
        the baseline trial's (the pending one may become the top). None before the baseline ran."""
        if not tops and pending:
            tops = [t for t in self.study.get_trials(deepcopy=False)
                    if t.user_attrs.get("baseline") and t.user_attrs.get("status") == "ok"][:1]
        if not tops:
            return 0.0
        walls = sorted(float(t.user_attrs.get("wall_s", 0)) for t in tops)
        return walls[len(walls) // 2] * (self.options.final_rounds / self.options.rounds) + SPAWN_OVERHEAD_S

    def final(self, tops: list, timeout: float) -> FinalMeasure | str:
        reference = self._reference(self.study)
        config = TrainConfig.from_list(tops[0].user_attrs["knobs"])
        overall, _ = self._launch(config, name="final", timeout=timeout, rounds=self.options.final_rounds,
                                  reference=reference, compare_baseline=True)
        if not overall.ok:
            return overall.reason()
        ranks = overall.value
        summary = summarize(ranks, reference)
        summary["final_losses"] = [r["losses"] for r in ranks]
        base, cand = Timing.from_dict(ranks[0]["timing"]["baseline"]), Timing.from_dict(ranks[0]["timing"]["candidate"])
        summary["reliability"] = verdict(base, cand)
        return FinalMeasure(baseline=base, candidates={tops[0].number: (summary["status"], cand, summary)})

    def make_plan(self, decision: Decision, study) -> TrainingPlan:
        trials = study.get_trials(deepcopy=False)
        plan = TrainingPlan(batch_size=self.workload.batch_size, nproc=self.options.nproc,
                            fingerprint=self._fingerprint, workload=self._identity, device=self.options.device,
                            extra={"trials": len(trials), "tolerance": self.options.tolerance,
                                   "reference_losses": self._reference(study)})
        kind, top = decision.kind, decision.trial
        if kind == "nothing":
            plan.fell_back, plan.speedup = True, 1.0
            plan.note = ("no candidate was faster than the baseline during the search; keeping the baseline. "
                         + failure_note(trials))
            return plan
        config = TrainConfig.from_list(top.user_attrs["knobs"])
        plan.config = config
        if kind == "final_failed":
            plan.speedup = top.value
            plan.note = (f"final re-measurement failed ({decision.reason}); the plan keeps trial {top.number}, the "
                         "best of the search, with its search-time figures.")
            return plan
        _, cand, summary = decision.final.candidates[top.number]
        plan.extra["final"] = {k: v for k, v in summary.items() if k != "final_losses"}
        plan.extra["final_losses"] = summary.get("final_losses")
        if cand is not None and "samples_per_s" in summary:
            plan.baseline = {"samples_per_s": summary.get("baseline_samples_per_s"),
                             "window_ms": decision.final.baseline.to_dict()}
            plan.best = {"samples_per_s": summary["samples_per_s"], "window_ms": cand.to_dict()}
        plan.speedup = summary.get("speedup")
        plan.reliability = summary.get("reliability")
        plan.reliable = plan.reliability["reliable"] if plan.reliability else None
        more = unreliable_sentence(plan.reliability)
        if kind == "winner":
            plan.note = (f"{(plan.speedup - 1) * 100:.0f} % more samples/s than the baseline (num_workers=0, fp32), "
                         "re-measured side by side in fresh processes." + more)
            return plan
        plan.config, plan.fell_back = TrainConfig(), True
        plan.note = (f"best candidate ({config.label()}) was {plan.speedup or float('nan'):.2f}x the baseline in the "
                     f"final re-measurement ({summary.get('reason') or 'not faster beyond noise'}); the plan keeps the "
                     "baseline." + more)
        return plan


def summarize(ranks: list[dict[str, Any]], reference: list[list[float]] | None) -> dict[str, Any]:
    """One trial's figures over its ranks: throughput sums, per-rank columns, the worst status."""
    bad = next((r for r in ranks if r.get("status") != "ok"), None)
    out: dict[str, Any] = {"status": bad["status"] if bad else "ok", "reason": bad.get("reason", "") if bad else "",
                           "knobs": ranks[0]["config"], "label": ranks[0]["label"], "losses": ranks[0].get("losses")}
    # ranks run side by side: a trial's build and timing last as long as its slowest rank's
    for key in ("build_s", "measure_s"):
        spans = [float(r[key]) for r in ranks if r.get(key) is not None]
        if spans:
            out[key] = round(max(spans), 2)
    if reference:
        out["reference_loss"] = reference[0][-1]
    if "eval_metric" in ranks[0]:
        out["eval_metric"] = ranks[0]["eval_metric"]
    if bad and "samples_per_s" not in bad:
        return out
    total = sum(r["samples_per_s"] for r in ranks)
    out.update(samples_per_s=total, peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
               peak_mem_mib=max(r.get("peak_mem_mib", 0.0) for r in ranks),
               bound=ranks[0]["bound"], loader_samples_per_s=ranks[0]["loader_samples_per_s"],
               compute_samples_per_s=ranks[0]["compute_samples_per_s"],
               spread=Timing.from_dict(ranks[0]["timing"]["candidate"]).iqr_rel,
               **load_attrs(ranks[0]["timing"]["candidate"].get("load")),
               cache_build_s=ranks[0]["notes"].get("cache_build_s"),
               fp32_modules=",".join(_cfg(ranks[0]).precision.fp32_modules) or None,
               checkpoint_modules=",".join(_cfg(ranks[0]).memory.checkpoint_modules) or None)
    if all("baseline_samples_per_s" in r for r in ranks):
        base = sum(r["baseline_samples_per_s"] for r in ranks)
        out.update(baseline_samples_per_s=base, speedup=total / base)
    if len(ranks) > 1:
        for r in ranks:
            out[f"rank{r['rank']}_samples_per_s"] = r["samples_per_s"]
            out[f"rank{r['rank']}_comm_share"] = r.get("comm_share")
            out[f"rank{r['rank']}_loss"] = r["losses"][-1]
    return out


def verdict(base: Timing, cand: Timing) -> dict[str, Any]:
    """Whether a candidate's figure beside the baseline can be trusted (`machine_load.reliability`):
    the load over both timings, and the span of the per-round speed-ups (the rounds are taken in turns)."""
    pairs = [b / c for b, c in zip(base.samples_ms, cand.samples_ms) if c > 0]
    return reliability(merge_loads([base.load, cand.load]), (min(pairs), max(pairs)) if pairs else None)


def _cfg(rank_result: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_list(rank_result["config"])


def tune_training(workload: TrainWorkload, options: TrainTuneOptions, progress: Progress | None = None) -> TrainTuneResult:
    """Run one training tune on the engine."""
    task = TrainingTask(workload, options)
    return Search(task, options, patience=task.patience, progress=progress).run()


def tune_training_file(file: Path, *, budget: str, out: Path | None, nproc: int, max_memory: str | None,
                       batch_size: int | None, tolerance: float | None, storage: str | None, study: str | None,
                       resume: bool, seed: int, device: str, command: str, progress: Progress | None = None,
                       heartbeat: int = 10, strategy: str = "training",
                       started: float | None = None) -> TrainTuneResult:
    """`autotiacc tune FILE --mode train` from its flags: every flag checked before any work, the
    training file checked in a child, then the tune; the caller writes the report and prints.
    `started`: time.monotonic() when the budget began (the command's start; default: now)."""
    from ..durations import parse_duration
    from ..outputs import check_output_dir
    from .workload import load_train_workload

    started = time.monotonic() if started is None else started
    budget_s = parse_duration(budget)
    strategy_for("training", strategy)  # a wrong strategy is refused before any work
    if resume and (out is None or not (Path(out) / "run.json").exists()):
        raise UserInputError("`--resume` needs `--out DIR` holding the run.json of the training tune to continue.")
    max_memory_mib = parse_memory(max_memory) if max_memory else None  # bad flags fail before any import
    check_output_dir(out or Path("runs"))  # writable (the default goes under runs/), before any work
    out = out or Path("runs") / f"{Path(file).stem}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    options = TrainTuneOptions(budget_s=budget_s, out_dir=Path(out), nproc=nproc,
                               max_memory_mib=max_memory_mib,
                               tolerance=tolerance if tolerance is not None else 0.05, storage=storage,
                               study_name=study or STUDY_NAME, resume=resume, seed=seed, device=device, command=command,
                               heartbeat_s=heartbeat, strategy=strategy, started=started)
    # the check of the training file runs first, in a child killed at the end of the budget
    workload = load_train_workload(file, batch_size=batch_size, timeout=max(budget_s - (time.monotonic() - started), 5.0),
                                   limit=f"the {budget_s:.0f} s --budget", device=options.device, nproc=nproc)
    return tune_training(workload, options, progress)
