"""The training tune: baseline first, then Optuna ask/tell over training knobs; each trial
runs in fresh rank processes (`launch.run_ranks`), timed side by side with the baseline;
the winner is re-measured against the baseline in fresh processes before it becomes a plan.

Every finished trial is in the Optuna storage and `trials.csv` before the next one starts.
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BudgetError, UserInputError
from ..measure import Timing, faster_beyond_noise
from ..tuner import MIN_BUDGET_S, SPAWN_OVERHEAD_S, Tuner, record_trial, write_trials_csv
from .config import TrainConfig, TrainSpace, seeds, suggest
from .launch import run_ranks
from .plan import TrainingPlan
from .trial import train_trial
from .workload import TrainWorkload

STUDY_NAME = "autotiacc-train"
Progress = Callable[[dict[str, Any]], None]
_UNITS = {"": 1 / 2**20, "b": 1 / 2**20, "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024, "m": 1, "mb": 1, "mib": 1,
          "g": 1024, "gb": 1024, "gib": 1024, "t": 2**20, "tb": 2**20, "tib": 2**20}


def parse_memory(text: str | float | int, *, name: str = "--max-memory") -> float:
    """'4GiB', '512M', '2g' -> MiB. A bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserInputError(f"`{name}` got {text!r}: use a positive size such as 512MiB, 4GiB or 2G.")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass
class TrainTuneOptions:
    budget_s: float
    out_dir: Path
    nproc: int = 1
    max_memory_mib: float | None = None
    tolerance: float = 0.05  # relative difference of the loss after the guard steps
    seed: int = 0
    storage: str | None = None
    study_name: str = STUDY_NAME
    resume: bool = False
    device: str = "cpu"
    command: str = ""
    trial_timeout_s: float = 240.0
    rounds: int = 3
    final_rounds: int = 6
    patience: int = 15
    compile: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise UserInputError(f"`--nproc` got {self.nproc}: use 1 or more processes.")
        if not self.tolerance > 0:
            raise UserInputError(f"`--tolerance` got {self.tolerance!r}: use a positive number, e.g. 0.05.")
        if self.budget_s < MIN_BUDGET_S:
            raise BudgetError(f"`--budget` of {self.budget_s:.0f}s is too small to measure even the baseline; "
                              f"use at least {MIN_BUDGET_S:.0f}s (3m or more is sensible for training).")
        if self.device != "cpu" and self.nproc > 1:
            raise UserInputError(f"`--nproc` {self.nproc} with `--device` {self.device}: multi-process tuning runs "
                                 "on CPU with gloo here; use --device cpu.")


@dataclass
class TrainTuneResult:
    plan: TrainingPlan
    run_dir: Path
    n_trials: int
    wall_s: float


def _space(workload: TrainWorkload, options: TrainTuneOptions) -> TrainSpace:
    import torch

    from ..hardware import usable_cores

    model = workload.build_model()
    opt = workload.make_optimizer(model.parameters())
    return TrainSpace(cores=usable_cores(), nproc=options.nproc, cuda=options.device.startswith("cuda"),
                      has_conv=any(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
                      fused_ok="fused" in getattr(opt, "defaults", {}), compile=options.compile)


def _params(overrides: dict[str, Any]) -> dict[str, Any]:
    """Full Optuna params for an enqueued candidate: the baseline's values, then the overrides."""
    base = {k: v for k, v in TrainConfig().flat().items() if not isinstance(v, tuple)}
    return {**base, **overrides}


class TrainingTuner:
    """One training tune: construct, then `run()`."""

    def __init__(self, workload: TrainWorkload, options: TrainTuneOptions, progress: Progress | None = None) -> None:
        self.workload, self.options = workload, options
        self.progress = progress or (lambda event: None)
        self.run_dir = Path(options.out_dir)
        self.t_start = time.monotonic()
        self.deadline = self.t_start + options.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _prepare_dir(self) -> None:
        d = self.run_dir
        if (d / "run.json").exists() and not self.options.resume and self.options.storage is None:
            raise UserInputError(f"`--out` {d} already holds a tune; add --resume to continue it, or choose another --out.")
        try:
            (d / "trials").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"`--out` {d} is not writable: {exc.strerror or exc}.") from None

    def _study(self, identity: dict[str, Any]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.options.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = optuna.samplers.TPESampler(seed=self.options.seed, multivariate=True, group=True,
                                                 n_startup_trials=4)
        study = optuna.create_study(study_name=self.options.study_name, storage=storage, direction="maximize",
                                    sampler=sampler, load_if_exists=True)
        old = study.user_attrs.get("workload")
        if old and old.get("param_shapes_sha256") != identity.get("param_shapes_sha256"):
            raise UserInputError("this study tuned a different model (parameter shapes differ); use another --out.")
        Tuner._fail_interrupted(study)  # trials left RUNNING by a killed tune will never finish
        study.set_user_attr("workload", identity)
        study.set_user_attr("nproc", self.options.nproc)
        return study

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainTuneResult:
        from ..hardware import fingerprint, usable_cores

        self._prepare_dir()
        fp = fingerprint(self.options.device)
        identity = self.workload.identity()
        space = _space(self.workload, self.options)
        study = self._study(identity)
        self._write_run_json(fp, identity)
        self.threads = max(1, usable_cores() // self.options.nproc)
        if not study.trials:
            study.enqueue_trial(_params({}))
            for overrides in seeds(space):
                study.enqueue_trial(_params(overrides), skip_if_exists=True)
        self.progress({"event": "start", "budget_s": self.options.budget_s, "strategy": "training",
                       "resumed_trials": len(study.trials)})
        seen = {t.user_attrs["key"]: t.number for t in study.trials if "key" in t.user_attrs and t.state.is_finished()}
        stale = skips = 0
        best = self._best(study)
        stop = "budget"
        while True:
            if self.left() - self._reserve(study) < max(SPAWN_OVERHEAD_S + 5, 0.8 * self._typical_wall(study)):
                break  # a trial that cannot finish in time would only be killed
            if stale >= self.options.patience:
                stop = f"no gain in {stale} trials"
                break
            if skips >= 40:
                stop = "search space exhausted"
                break
            trial = study.ask()
            config = suggest(trial, space)
            key = json.dumps(config.flat(), sort_keys=True, default=str)
            trial.set_user_attr("label", config.label())
            trial.set_user_attr("key", key)
            if key in seen:
                self._duplicate(study, trial, seen[key])
                skips += 1
                stale += 1
                continue
            skips = 0
            seen[key] = trial.number
            timeout = min(self.options.trial_timeout_s, self.left() - self._reserve(study))
            self._run_trial(study, trial, config, timeout=timeout)
            new_best = self._best(study)
            stale = 0 if new_best > best * 1.01 else stale + 1
            best = max(best, new_best)
            write_trials_csv(study, self.run_dir / "trials.csv")
        self.progress({"event": "search_done", "reason": stop, "left_s": self.left()})
        plan = self._finalize(study, fp, identity)
        write_trials_csv(study, self.run_dir / "trials.csv")
        n = sum(1 for t in study.trials if t.user_attrs.get("status") not in (None, "duplicate"))
        wall = time.monotonic() - self.t_start
        self._update_run_json(stop=stop, wall_s=wall)
        return TrainTuneResult(plan=plan, run_dir=self.run_dir, n_trials=n, wall_s=wall)

    def _duplicate(self, study, trial, number: int) -> None:
        from optuna.trial import TrialState

        prev = study.trials[number]
        trial.set_user_attr("status", "duplicate")
        trial.set_user_attr("reason", f"same configuration as trial {number}")
        if prev.state == TrialState.COMPLETE:
            study.tell(trial, prev.value)
        else:
            study.tell(trial, state=TrialState.FAIL)

    def _best(self, study) -> float:
        from optuna.trial import TrialState

        vals = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(vals) if vals else 1.0

    @staticmethod
    def _typical_wall(study) -> float:
        walls = sorted(float(t.user_attrs.get("wall_s", 0)) for t in study.trials if t.user_attrs.get("status") == "ok")
        return walls[len(walls) // 2] if walls else 0.0

    def _reserve(self, study) -> float:
        """Time kept for the final re-measurement (a baseline and the winner, longer windows);
        none while no candidate beats the baseline, as there is then nothing to re-measure."""
        if self._best(study) <= 1.0:
            return 0.0
        return self._typical_wall(study) * (self.options.final_rounds / self.options.rounds) + SPAWN_OVERHEAD_S

    def _reference(self, study) -> list[list[float]] | None:
        return study.user_attrs.get("reference_losses")

    def _launch(self, config: TrainConfig, *, name: str, timeout: float, reference, rounds: int,
                compare_baseline: bool):
        return run_ranks(train_trial, self.options.nproc, self.workload, config.to_list(), timeout=timeout,
                         log_dir=self.run_dir / "trials" / name, pid_file=self.run_dir / "trials" / f"{name}.pids",
                         reference_losses=reference, tolerance=self.options.tolerance, rounds=rounds,
                         compare_baseline=compare_baseline, max_memory_mib=self.options.max_memory_mib,
                         seed=self.options.seed, threads=self.threads, gloo_timeout_s=max(30.0, timeout),
                         device=self.options.device)

    def _run_trial(self, study, trial, config: TrainConfig, *, timeout: float) -> None:
        from optuna.trial import TrialState

        name = f"{trial.number:04d}"
        (self.run_dir / "trials" / name).mkdir(parents=True, exist_ok=True)
        self.progress({"event": "trial_start", "number": trial.number, "label": config.label()})
        reference = self._reference(study)
        is_baseline = config == TrainConfig()
        overall, _ = self._launch(config, name=name, timeout=timeout, rounds=self.options.rounds,
                                  reference=None if is_baseline else reference,
                                  compare_baseline=not is_baseline)
        attrs: dict[str, Any] = {"wall_s": round(overall.seconds, 2)}
        state, value = TrialState.FAIL, None
        if not overall.ok:
            attrs.update(status=overall.status, reason=overall.error)
            if overall.traceback:
                (self.run_dir / "trials" / name / "error.txt").write_text(overall.traceback)
        else:
            ranks = overall.value
            attrs.update(summarize(ranks, reference))
            if attrs["status"] == "ok":
                if is_baseline:
                    study.set_user_attr("reference_losses", [r["losses"] for r in ranks])
                    attrs["speedup"] = 1.0
                state, value = TrialState.COMPLETE, attrs.get("speedup", 1.0)
        record_trial(study, trial, attrs, state, value)
        if trial.number == 0 and state != TrialState.COMPLETE:
            raise BudgetError(f"the baseline training trial did not finish ({attrs.get('reason')}); give a larger "
                              "`--budget` or check the training file (see the trial logs in the run directory).")
        self.progress({"event": "trial_end", "number": trial.number, "status": attrs["status"],
                       "speedup": attrs.get("speedup"), "reason": attrs.get("reason", ""),
                       "best_speedup": self._best(study), "left_s": self.left()})

    # -- the end -----------------------------------------------------------------------------
    def _finalize(self, study, fp: dict, identity: dict) -> TrainingPlan:
        from optuna.trial import TrialState

        plan = TrainingPlan(batch_size=self.workload.batch_size, nproc=self.options.nproc, fingerprint=fp,
                            workload=identity, device=self.options.device,
                            extra={"trials": len(study.trials), "tolerance": self.options.tolerance,
                                   "reference_losses": self._reference(study)})
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("status") == "ok" and t.user_attrs.get("label") != TrainConfig().label()]
        done.sort(key=lambda t: -t.value)
        if not done or done[0].value <= 1.0:
            fails = [f"trial {t.number} ({t.user_attrs.get('label')}): {t.user_attrs.get('reason')}"
                     for t in study.trials if t.user_attrs.get("status") not in ("ok", "duplicate", None)]
            plan.fell_back, plan.speedup = True, 1.0
            plan.note = ("no candidate was faster than the baseline during the search; keeping the baseline. "
                         + ("Failures: " + " | ".join(fails[:8]) if fails else ""))
            return self._save(plan)
        top = done[0]
        config = TrainConfig.from_list(top.user_attrs["knobs"])
        self.progress({"event": "final_start", "candidates": [config.label()]})
        timeout = max(self.left() - 2, SPAWN_OVERHEAD_S + 10)
        overall, _ = self._launch(config, name="final", timeout=timeout, rounds=self.options.final_rounds,
                                  reference=self._reference(study), compare_baseline=True)
        plan.config = config
        if not overall.ok:
            plan.speedup = top.value
            plan.note = (f"final re-measurement failed ({overall.reason()}); the plan keeps trial {top.number}, the "
                         "best of the search, with its search-time figures.")
            return self._save(plan)
        ranks = overall.value
        summary = summarize(ranks, self._reference(study))
        plan.extra["final"] = summary
        plan.extra["final_losses"] = [r["losses"] for r in ranks]
        base, cand = Timing.from_dict(ranks[0]["timing"]["baseline"]), Timing.from_dict(ranks[0]["timing"]["candidate"])
        plan.baseline = {"samples_per_s": summary["baseline_samples_per_s"], "window_ms": base.to_dict()}
        plan.best = {"samples_per_s": summary["samples_per_s"], "window_ms": cand.to_dict()}
        plan.speedup = summary.get("speedup")
        if summary["status"] == "ok" and faster_beyond_noise(cand, base):
            plan.note = (f"{(plan.speedup - 1) * 100:.0f} % more samples/s than the baseline (num_workers=0, fp32), "
                         "re-measured side by side in fresh processes.")
            return self._save(plan)
        plan.config, plan.fell_back = TrainConfig(), True
        plan.note = (f"best candidate ({config.label()}) was {plan.speedup or float('nan'):.2f}x the baseline in the "
                     f"final re-measurement ({summary.get('reason') or 'not faster beyond noise'}); the plan keeps the "
                     "baseline.")
        return self._save(plan)

    def _save(self, plan: TrainingPlan) -> TrainingPlan:
        plan.save(self.run_dir / "plan.json")
        self.progress({"event": "plan", "label": plan.label, "speedup": plan.speedup, "note": plan.note})
        return plan

    def _write_run_json(self, fp: dict, identity: dict) -> None:
        from ..distributed import redact  # a password never lands in the run directory

        path = self.run_dir / "run.json"
        prev = json.loads(path.read_text()) if path.exists() else {}
        sessions = prev.get("sessions", []) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                "budget_s": self.options.budget_s,
                                                "command": redact(self.options.command)}]
        data = {"mode": "train", "workload": identity, "fingerprint": fp, "strategy": "training",
                "nproc": self.options.nproc, "tolerance": self.options.tolerance,
                "max_memory_mib": self.options.max_memory_mib, "device": self.options.device,
                "storage": redact(self.options.storage) if self.options.storage else "sqlite:///study.db",
                "study_name": self.options.study_name,
                "sessions": sessions, **self.options.extra}
        path.write_text(json.dumps(data, indent=2, default=str))

    def _update_run_json(self, **fields: Any) -> None:
        path = self.run_dir / "run.json"
        data = json.loads(path.read_text())
        data["sessions"][-1].update(fields)
        path.write_text(json.dumps(data, indent=2, default=str))


def summarize(ranks: list[dict[str, Any]], reference: list[list[float]] | None) -> dict[str, Any]:
    """One trial's figures over its ranks: throughput sums, per-rank columns, the worst status."""
    bad = next((r for r in ranks if r.get("status") != "ok"), None)
    out: dict[str, Any] = {"status": bad["status"] if bad else "ok", "reason": bad.get("reason", "") if bad else "",
                           "knobs": ranks[0]["config"], "label": ranks[0]["label"], "losses": ranks[0].get("losses")}
    if reference:
        out["reference_loss"] = reference[0][-1]
    if "eval_metric" in ranks[0]:
        out["eval_metric"] = ranks[0]["eval_metric"]
    if bad and "samples_per_s" not in bad:
        return out
    total = sum(r["samples_per_s"] for r in ranks)
    out.update(samples_per_s=total, peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
               bound=ranks[0]["bound"], loader_samples_per_s=ranks[0]["loader_samples_per_s"],
               compute_samples_per_s=ranks[0]["compute_samples_per_s"],
               spread=Timing.from_dict(ranks[0]["timing"]["candidate"]).iqr_rel,
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


def _cfg(rank_result: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_list(rank_result["config"])


def tune_training(workload: TrainWorkload, options: TrainTuneOptions, progress: Progress | None = None) -> TrainTuneResult:
    """Run one training tune; see `TrainingTuner`."""
    return TrainingTuner(workload, options, progress).run()


def cli_tune(file: Path, *, budget: str, out: Path | None, nproc: int, max_memory: str | None,
             batch_size: int | None, tolerance: float | None, storage: str | None, study: str | None,
             resume: bool, seed: int, device: str, command: str, echo: Callable[[str], None],
             progress: Progress | None = None) -> TrainTuneResult:
    """`autotiacc tune FILE --mode train`: the CLI branch, kept here so cli.py stays thin."""
    from ..durations import parse_duration
    from .report import write_training_report
    from .workload import load_train_workload

    budget_s = parse_duration(budget)
    if resume and (out is None or not (Path(out) / "run.json").exists()):
        raise UserInputError("`--resume` needs `--out DIR` holding the run.json of the training tune to continue.")
    max_memory_mib = parse_memory(max_memory) if max_memory else None  # bad flags fail before any import
    workload = load_train_workload(file, batch_size=batch_size)
    out = out or Path("runs") / f"{workload.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    options = TrainTuneOptions(budget_s=budget_s, out_dir=Path(out), nproc=nproc,
                               max_memory_mib=max_memory_mib,
                               tolerance=tolerance if tolerance is not None else 0.05, storage=storage,
                               study_name=study or STUDY_NAME, resume=resume, seed=seed, device=device, command=command)
    result = tune_training(workload, options, progress)
    written = write_training_report(result.run_dir)
    p = result.plan
    echo(f"plan: {p.label}")
    echo(f"samples/s: {p.speedup:.2f}x the baseline (num_workers=0, fp32) — {p.note}" if p.speedup and not
         math.isnan(p.speedup) else f"result: {p.note}")
    echo(f"trials measured: {result.n_trials} in {result.wall_s:.0f}s (budget {budget_s:.0f}s, {nproc} process(es))")
    echo(f"run directory: {result.run_dir}  (plan.json, trials.csv, {written['md'].name}, {written['html'].name})")
    return result
