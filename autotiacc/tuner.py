"""The Optuna loop: baseline first, staged search (ask/tell), isolated trials with timeouts,
accuracy guard, pruning, durable and resumable state, a final interleaved re-measurement.

Every finished trial is in the Optuna storage and `trials.csv` before the next one starts,
so a tune killed at any point keeps its trials and `--resume` continues the same study.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .accuracy import DEFAULT_TOLERANCE
from .errors import BudgetError, UserInputError
from .engine.fidelity import measured_env
from .engine.workers import WorkerPool, run_isolated, worker_env
from .knobs import SearchContext, all_knobs, configs_from_params, describe
from .layer_precision import best_full_precision
from .measure import Timing, faster_beyond_noise
from .plan import Plan
from .shape_tuning import FINAL_WARMUP_S, shape_tuning_for
from .strategy import Strategy, load_strategy
from .workload import ModelFacts, Workload

STUDY_NAME = "autotiacc"
MIN_BUDGET_S = 10.0
SPAWN_OVERHEAD_S = 6.0  # starting a trial process and importing torch, measured ~3-5 s here
Progress = Callable[[dict[str, Any]], None]


@dataclass
class TuneOptions:
    budget_s: float
    out_dir: Path
    level: int = 1
    strategy: str = "inference-latency"
    tolerance: float | None = None
    storage: str | None = None
    study_name: str = STUDY_NAME
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    traffic_file: str | None = None  # dynamic shapes: CSV/JSON traffic mix (else model.py traffic())
    p99_ms: float | None = None  # dynamic shapes: p99 latency budget over the traffic mix
    heartbeat_s: int = 10  # shared storage only: a dead worker's trials fail after 3 missed beats
    started: float | None = None  # time.monotonic() when the budget started (the CLI checks the model first)

    def __post_init__(self) -> None:
        if self.level not in (0, 1, 2):
            raise UserInputError(f"`--level` got {self.level!r}: use 0 (no precision change), 1 (default) or 2 (aggressive).")
        if self.tolerance is not None and not self.tolerance > 0:
            raise UserInputError(f"`--tolerance` got {self.tolerance!r}: use a positive number, e.g. 0.01.")
        if self.budget_s < MIN_BUDGET_S:
            raise BudgetError(f"`--budget` of {self.budget_s:.0f}s is too small to measure even the baseline; "
                              f"use at least {MIN_BUDGET_S:.0f}s (2m or more is sensible).")

    @property
    def effective_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.level]


@dataclass
class TuneResult:
    plan: Plan
    run_dir: Path
    n_trials: int
    wall_s: float


def search_context(facts: ModelFacts, device: str, level: int) -> SearchContext:
    from .hardware import usable_cores

    try:
        import onnxruntime  # noqa: F401

        ort = True
    except ImportError:
        ort = False
    return SearchContext(device=device, level=level, cores=usable_cores(), has_conv=facts.has_conv, onnxruntime=ort,
                         module_names=facts.module_names)


def _key(values: dict[str, dict]) -> str:
    return json.dumps({k: v for k, v in sorted(values.items())}, sort_keys=True, default=str)


def _values(configs) -> dict[str, dict]:
    import dataclasses

    return {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}


def _allowed(entry: dict[str, dict], strategy: Strategy, ctx: SearchContext) -> bool:
    """An enqueue entry is used only if every value it names is searchable here."""
    from .knobs import get_knob

    for knob_name, fields in entry.items():
        knob = get_knob(knob_name)
        for param, value in fields.items():
            if value not in knob.choices(param, strategy.space(knob_name), ctx):
                return False
    return True


def _to_params(entry: dict[str, dict]) -> dict[str, Any]:
    """Enqueue entries are nested by knob and list only what differs from the baseline; Optuna
    params are flat (field names are unique across knobs) and must pin every default too."""
    params = {k: v for values in _values(configs_from_params({})).values() for k, v in values.items()}
    params.update({param: value for fields in entry.values() for param, value in fields.items()})
    return {k: v for k, v in params.items() if v is not None}


class Tuner:
    """One tune: construct, then `run()`. Progress events go to `progress` (CLI bar, logs)."""

    def __init__(self, workload: Workload, options: TuneOptions, progress: Progress | None = None) -> None:
        self.workload, self.options = workload, options
        self.strategy = load_strategy(options.strategy)
        self.progress = progress or (lambda event: None)
        self.run_dir = Path(options.out_dir)
        self.t_start = options.started if options.started is not None else time.monotonic()
        self.deadline = self.t_start + options.budget_s
        # The shape dimension: one shape, or buckets over a traffic mix (see shape_tuning's hooks).
        self.shapes = shape_tuning_for(workload, traffic_file=options.traffic_file, p99_ms=options.p99_ms,
                                             strategy=self.strategy, device=options.device)

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        d = self.run_dir
        if d.exists() and (d / "run.json").exists() and not self.options.resume and self.options.storage is None:
            raise UserInputError(f"`--out` {d} already holds a tune; add --resume to continue it, or choose another --out.")
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "trials").mkdir(exist_ok=True)
            probe = d / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserInputError(f"`--out` {d} is not writable: {exc.strerror or exc}.") from None

    def _study(self, fingerprint: dict[str, Any], identity: dict[str, Any]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.options.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        with warnings.catch_warnings():  # `group` is marked experimental by Optuna
            warnings.simplefilter("ignore")
            sampler = optuna.samplers.TPESampler(seed=self.options.seed, multivariate=True, group=True,
                                                 n_startup_trials=4)
        self._tpe, self._random = sampler, optuna.samplers.RandomSampler(seed=self.options.seed + 1)
        self._created = False
        if self.options.storage is not None:  # possibly shared by several workers: see distributed.py
            from . import distributed

            storage = distributed.open_storage(storage, heartbeat_s=self.options.heartbeat_s)
            study, self._created = distributed.create_or_load(storage, self.options.study_name, sampler)
            if not self._created:
                distributed.wait_for_setup(study)
        else:
            study = optuna.create_study(study_name=self.options.study_name, storage=storage, direction="minimize",
                                        sampler=sampler, load_if_exists=True)
        if self.options.resume or self.options.storage is not None:
            self._check_same_setup(study, fingerprint, identity)
            self._fail_interrupted(study)
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("workload", identity)
        study.set_user_attr("strategy", self.strategy.name)
        study.set_user_attr("level", self.options.level)
        return study

    def _check_same_setup(self, study, fingerprint, identity) -> None:
        from .hardware import fingerprint_differences

        old_fp = study.user_attrs.get("fingerprint")
        if old_fp:
            diffs = fingerprint_differences(old_fp, fingerprint)
            if diffs:
                raise UserInputError("this study was measured on other hardware/software, figures would not be "
                                     "comparable: " + "; ".join(diffs) + ". Use another --study or --out.")
        old = study.user_attrs.get("workload")
        if old and old.get("param_shapes_sha256") != identity.get("param_shapes_sha256"):
            raise UserInputError("this study tuned a different model (parameter shapes differ); use another --out.")

    @staticmethod
    def _fail_interrupted(study) -> None:
        """Trials left RUNNING by a killed tune will never finish: mark them failed, keep the rest."""
        import optuna
        from optuna.trial import TrialState

        from .distributed import fail_stale_trials, heartbeat_enabled

        if heartbeat_enabled(study):  # shared storage: only trials whose worker stopped beating
            fail_stale_trials(study)
            return
        storage = study._storage
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            hb = getattr(storage, "get_heartbeat_interval", lambda: None)()
            if hb:  # with heartbeats on, a live worker's trial is not ours to fail
                continue
            storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
            storage.set_trial_user_attr(t._trial_id, "reason", "the tune was interrupted while this trial ran")
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TuneResult:
        self.pool: WorkerPool | None = None
        try:
            return self._run()
        finally:
            if self.pool is not None:
                self.pool.close()

    def _run(self) -> TuneResult:
        from .hardware import fingerprint

        # the user's code runs first in a child, under the budget; its bugs surface before anything is written
        facts = self.workload.validate(timeout=max(1.0, self.left()), limit=f"the {self.options.budget_s:.0f} s --budget")
        self._prepare_dir()
        ctx = search_context(facts, self.options.device, self.options.level)
        ctx.extras.update(self._profile())
        fp = fingerprint(self.options.device)
        identity = facts.identity
        study = self._study_obj = self._study(fp, identity)
        self._write_run_json(fp, identity)
        knobs = [k for k in all_knobs() if k.applies(ctx) or k.name in ("execution", "precision", "runtime")]
        seen: dict[str, int] = {}
        for t in study.trials:
            if "knobs" in t.user_attrs and t.state.is_finished():
                seen.setdefault(_key(t.user_attrs["knobs"]), t.number)
        shared = self.options.storage is not None
        if self._created or (not shared and not any(t.state.is_finished() for t in study.trials)):
            for entry in self.strategy.enqueue:
                if _allowed(entry, self.strategy, ctx):
                    study.enqueue_trial({**ctx.extras.get("precision_fp32", {}), **_to_params(entry)}, skip_if_exists=True)
            for params in ctx.extras.get("precision_enqueue", []):  # per-layer precision starting point
                study.enqueue_trial({**_to_params({}), **params}, skip_if_exists=True)
        self.progress({"event": "start", "budget_s": self.options.budget_s, "strategy": self.strategy.name,
                       "resumed_trials": len(seen)})
        # One warm worker for the whole search (replaced only after a crash, hang or OOM).
        self.pool = WorkerPool(env=worker_env(self.run_dir), log_dir=self.run_dir / "trials")
        stale = skips = 0
        best = self._best_ratio(study)
        while True:
            reserve = self._final_reserve(study)
            left = self.left() - reserve
            if left < max(SPAWN_OVERHEAD_S + 2, 0.8 * self._typical_trial_s(study)):
                stop = "budget"
                break
            if stale >= self.strategy.patience:
                stop = f"no gain in {stale} trials"
                break
            if skips >= 40:
                stop = "search space exhausted"
                break
            # TPE ignores failed trials and keeps proposing them again; after a run of duplicates,
            # draw the next candidate at random so the budget goes to configurations not yet seen.
            study.sampler = self._random if skips >= 3 else self._tpe
            if shared:
                from .distributed import claim, fail_stale_trials

                fail_stale_trials(study)
            trial = study.ask()
            if shared:
                claim(study, trial)
            configs = {k.name: k.suggest(trial, self.strategy.space(k.name), ctx) for k in knobs}
            configs = configs_from_params(_values(configs))
            values = self.shapes.suggest(trial, _values(configs), ctx)
            is_baseline = values == _values(configs_from_params({}))
            trial.set_user_attr("knobs", values)
            trial.set_user_attr("baseline", is_baseline)
            trial.set_user_attr("label", describe(configs) + self.shapes.label(values))
            reason = next((r for k in knobs if (r := k.incompatible(configs, ctx))), None)
            key = _key(values)
            if shared:  # other workers' finished trials count as seen too
                for t in study.get_trials(deepcopy=False):
                    if "knobs" in t.user_attrs and t.state.is_finished() and t.number != trial.number:
                        seen.setdefault(_key(t.user_attrs["knobs"]), t.number)
            if reason or key in seen:
                self._skip(study, trial, reason, seen.get(key))
                skips += 1
                stale += 0 if reason else 1
                continue
            skips = 0
            seen[key] = trial.number
            # One slow candidate (a compile on a loaded machine) must not eat the whole budget.
            cap = max(self.strategy.max_trial_share * self.options.budget_s, SPAWN_OVERHEAD_S + 10)
            if is_baseline:
                cap = left  # the baseline is the one trial every plan needs
            self._run_trial(study, trial, values, timeout=min(self.strategy.trial_timeout_s, left, cap), best=best)
            new_best = self._best_ratio(study)
            stale = 0 if new_best < best * 0.99 else stale + 1
            best = min(best, new_best)
            self._write_trials(study)
        self.pool.close()  # before the final re-measurement: nothing else runs beside it
        self.progress({"event": "search_done", "reason": stop, "left_s": self.left()})
        if shared:
            from .distributed import fail_stale_trials

            fail_stale_trials(study)
        plan = self._finalize(study, fp, identity)
        n = sum(1 for t in study.trials if t.user_attrs.get("status") not in (None, "duplicate", "skipped"))
        result = TuneResult(plan=plan, run_dir=self.run_dir, n_trials=n, wall_s=time.monotonic() - self.t_start)
        self._write_trials(study)
        self._update_run_json(stop=stop, wall_s=result.wall_s)
        return result

    def _profile(self) -> dict[str, Any]:
        """Profile + per-layer sensitivity into profile.json; extras for the precision knob."""
        from .layer_precision import plan_summary, prepare_search

        extras = prepare_search(self.workload, self.run_dir, device=self.options.device,
                                level=self.options.level, strategy=self.strategy,
                                tolerance=self.options.effective_tolerance,
                                timeout=min(max(30.0, 0.2 * self.left()), max(1.0, self.left())),
                                resume=self.options.resume)
        self.plan_extra = {"layer_precision": plan_summary(self.run_dir)}
        return extras

    def _skip(self, study, trial, reason: str | None, duplicate_of: int | None) -> None:
        from optuna.trial import TrialState

        if reason:
            trial.set_user_attr("status", "skipped")
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.PRUNED)
            return
        prev = study.trials[duplicate_of]
        trial.set_user_attr("status", "duplicate")
        trial.set_user_attr("reason", f"same configuration as trial {duplicate_of}")
        if prev.state == TrialState.COMPLETE:
            study.tell(trial, prev.value)
        else:
            study.tell(trial, state=TrialState.PRUNED if prev.state == TrialState.PRUNED else TrialState.FAIL)

    def _best_ratio(self, study) -> float:
        from optuna.trial import TrialState

        vals = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return min(vals) if vals else 1.0

    def _final_reserve(self, study) -> float:
        """Time kept for the final re-measurement: a fresh process, rebuilding the top candidates,
        warming up every runner (baseline included), the timing window, and the plan/report."""
        tops = self._top(study)
        if not tops:  # nothing to re-measure: the plan is written at once
            return 2.0
        return SPAWN_OVERHEAD_S + self.shapes.final_reserve(tops) + 5.0

    def _typical_trial_s(self, study) -> float:
        """Median wall time of measured trials: don't start one that cannot finish in time."""
        walls = sorted(float(t.user_attrs["wall_s"]) for t in study.trials
                       if t.user_attrs.get("status") in ("ok", "pruned", "rejected") and "wall_s" in t.user_attrs)
        return walls[len(walls) // 2] if walls else SPAWN_OVERHEAD_S + 2

    def _top(self, study) -> list:
        from optuna.trial import TrialState

        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("status") == "ok"]
        done.sort(key=lambda t: t.value)
        out, keys = [], set()
        for t in done:
            k = _key(t.user_attrs["knobs"])
            if k not in keys and not t.user_attrs.get("baseline"):
                keys.add(k)
                out.append(t)
        return out[: self.strategy.final_top_k]

    def _run_trial(self, study, trial, values: dict, *, timeout: float, best: float) -> None:
        from optuna.trial import TrialState

        self.progress({"event": "trial_start", "number": trial.number, "label": trial.user_attrs["label"]})
        fn, extra = self.shapes.evaluator(final=False, measure_s=self.strategy.measure_s,
                                          prune_above=best * self.strategy.prune_factor)
        from .distributed import heartbeat

        with heartbeat(study, trial):  # a no-op unless the storage has heartbeats on
            outcome = self.pool.call(
                fn, self.workload, {"candidate": values}, timeout=timeout,
                log_path=str(self.run_dir / "trials" / f"{trial.number:04d}.log"),
                device=self.options.device, tolerance=self.options.effective_tolerance, **extra)
        attrs: dict[str, Any] = {"wall_s": round(outcome.seconds, 3)}
        if not outcome.ok:
            attrs.update(status=outcome.status, reason=outcome.error)
            if outcome.status == "timeout" and timeout < self.strategy.trial_timeout_s:
                attrs["reason"] = (f"stopped after {outcome.seconds:.0f} s, its share of the budget "
                                   f"(max_trial_share={self.strategy.max_trial_share:g} or the time left)")
            state, value = TrialState.FAIL, None
        else:
            res = outcome.value["candidates"]["candidate"]
            base = Timing.from_dict(outcome.value["baseline"])
            attrs.update(status=res["status"], reason=res.get("reason", ""), build_s=res.get("build_s"),
                         baseline_ms=base.median, compile=res.get("compile"),
                         rel_l2=(res.get("accuracy") or {}).get("rel_l2"), **res.get("trial_attrs", {}))
            if "timing" in res:
                cand = Timing.from_dict(res["timing"])
                attrs.update(latency_ms=cand.median, p90_ms=cand.p90, spread=cand.iqr_rel, speedup=res["speedup"])
            if res["status"] == "ok":
                state, value = TrialState.COMPLETE, res["ratio"]
            elif res["status"] == "pruned":
                state, value = TrialState.PRUNED, None
            else:
                state, value = TrialState.FAIL, None
        record_trial(study, trial, attrs, state, value)
        if trial.number == 0 and state != TrialState.COMPLETE and attrs["status"] == "timeout":
            raise BudgetError(f"`--budget` of {self.options.budget_s:.0f}s is too small to measure the baseline "
                              f"(it ran {outcome.seconds:.0f}s without finishing); give a larger budget.")
        self.progress({"event": "trial_end", "number": trial.number, "status": attrs["status"],
                       "speedup": attrs.get("speedup"), "reason": attrs.get("reason", ""),
                       "build_s": attrs.get("build_s"), "best_speedup": 1 / self._best_ratio(study),
                       "left_s": self.left()})

    # -- the end -----------------------------------------------------------------------------
    def _finalize(self, study, fp: dict, identity: dict) -> Plan:
        """Re-measure the top candidates interleaved with the baseline in one fresh process;
        keep the best only if it beats the baseline beyond noise, else fall back to baseline."""
        tops = self._top(study)
        tops += best_full_precision(tops, study.get_trials(deepcopy=False))
        baseline_cfg = configs_from_params({})
        plan = Plan(knobs=baseline_cfg, fingerprint=fp, workload=identity, device=self.options.device,
                    tolerance=self.options.effective_tolerance, level=self.options.level,
                    extra={"strategy": self.strategy.name, "trials": len(study.trials), "measured_env": measured_env(),
                           **getattr(self, "plan_extra", {})})
        base_trial = next((t for t in study.trials if t.user_attrs.get("baseline")
                           and t.user_attrs.get("baseline_ms")), None)
        if base_trial is not None:  # search-time figure, replaced below by the final re-measurement
            plan.baseline = {"median_ms": base_trial.user_attrs["baseline_ms"], "source": "search"}
        if not tops:
            failures = [f"trial {t.number} ({t.user_attrs.get('label')}): {t.user_attrs.get('reason')}"
                        for t in study.trials if t.user_attrs.get("status") not in ("ok", "duplicate", None)]
            plan.fell_back = True
            plan.note = ("no candidate passed the accuracy guard and measurement; keeping the baseline. "
                         + ("Failures: " + " | ".join(failures[:8]) if failures else ""))
            return self._save_plan(plan)
        self.progress({"event": "final_start", "candidates": [t.user_attrs["label"] for t in tops]})
        cands = {f"trial_{t.number}": t.user_attrs["knobs"] for t in tops}
        timeout = max(self.left() - 2, SPAWN_OVERHEAD_S + 5)
        fn, extra = self.shapes.evaluator(final=True)
        outcome = run_isolated(fn, self.workload, cands, timeout=timeout, env=worker_env(self.run_dir),
                               log_path=str(self.run_dir / "trials" / "final.log"), device=self.options.device,
                               tolerance=self.options.effective_tolerance, warmup_s=FINAL_WARMUP_S, **extra)
        if not outcome.ok:
            # Keep best-so-far from the search rather than ending with nothing.
            t = tops[0]
            plan.knobs = configs_from_params(t.user_attrs["knobs"])
            plan.speedup = t.user_attrs.get("speedup")
            plan.compile_s = t.user_attrs.get("build_s")
            plan.baseline = {"median_ms": t.user_attrs.get("baseline_ms"), "source": "search"}
            plan.best = {"median_ms": t.user_attrs.get("latency_ms"), "p90_ms": t.user_attrs.get("p90_ms"),
                         "spread": t.user_attrs.get("spread"), "source": "search"}
            self.shapes.record(plan, t.user_attrs["knobs"], t.user_attrs)
            plan.note = (f"final re-measurement failed ({outcome.reason()}); the plan keeps trial {t.number}, "
                         "the best of the search, with its search-time figures.")
            return self._save_plan(plan)
        base = Timing.from_dict(outcome.value["baseline"])
        plan.baseline = base.to_dict()
        ranked = sorted(((n, r) for n, r in outcome.value["candidates"].items() if r["status"] == "ok"),
                        key=lambda nr: nr[1]["ratio"])
        final = {n: {k: r.get(k) for k in ("status", "ratio", "reason", "build_s")} for n, r in outcome.value["candidates"].items()}
        plan.extra["final"] = final
        if ranked:
            name, res = ranked[0]
            cand = Timing.from_dict(res["timing"])
            if faster_beyond_noise(cand, base):
                plan.knobs = configs_from_params(res["knobs"])
                plan.best, plan.speedup = cand.to_dict(), base.median / cand.median
                plan.accuracy, plan.compile_s = res["accuracy"], res["build_s"]
                self.shapes.record(plan, res["knobs"], res)
                plan.note = (f"{(plan.speedup - 1) * 100:.0f} % faster than the baseline (eager fp32), "
                             "re-measured interleaved in a fresh process.")
                return self._save_plan(plan)
            plan.best = cand.to_dict()
            plan.note = (f"best candidate ({describe(configs_from_params(res['knobs']))}) was "
                         f"{base.median / cand.median:.2f}x the baseline in the final re-measurement: not faster "
                         "beyond noise, so the plan keeps the baseline.")
        else:
            plan.note = "every top candidate failed the final re-measurement; the plan keeps the baseline."
        plan.fell_back = True
        plan.speedup = 1.0
        return self._save_plan(plan)

    def _save_plan(self, plan: Plan) -> Plan:
        plan.save(self.run_dir / "plan.json")
        if self.options.storage is not None:
            from .distributed import publish_plan

            publish_plan(self._study_obj, plan.to_dict())
        self.progress({"event": "plan", "label": plan.label, "speedup": plan.speedup, "note": plan.note})
        return plan

    # -- durable records --------------------------------------------------------------------
    def _write_run_json(self, fp: dict, identity: dict) -> None:
        from .distributed import redact  # a password never lands in the run directory
        path = self.run_dir / "run.json"
        prev = json.loads(path.read_text()) if path.exists() else {}
        sessions = prev.get("sessions", [])
        sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "budget_s": self.options.budget_s,
                         "command": redact(self.options.command)})
        data = {"workload": identity, "fingerprint": fp, "strategy": self.strategy.name,
                "level": self.options.level, "tolerance": self.options.effective_tolerance,
                "device": self.options.device, "storage": redact(self.options.storage) if self.options.storage else "sqlite:///study.db",
                "study_name": self.options.study_name, "sessions": sessions, **self.options.extra}
        path.write_text(json.dumps(data, indent=2, default=str))
        if self.options.storage is not None:
            from .distributed import publish_run, record_session

            publish_run(self._study_obj, data)
            record_session(self._study_obj, **sessions[-1])

    def _update_run_json(self, **fields: Any) -> None:
        path = self.run_dir / "run.json"
        data = json.loads(path.read_text())
        data["sessions"][-1].update(fields)
        path.write_text(json.dumps(data, indent=2, default=str))
        if self.options.storage is not None:
            from .distributed import record_session

            record_session(self._study_obj, **fields)

    def _write_trials(self, study) -> None:
        write_trials_csv(study, self.run_dir / "trials.csv")


def record_trial(study, trial, attrs: dict[str, Any], state, value: float | None) -> None:
    """Store a trial's figures and reason, then tell Optuna its value (or its final state)."""
    for k, v in attrs.items():
        if v is not None:
            trial.set_user_attr(k, v)
    if value is not None:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)


def write_trials_csv(study, path: Path) -> None:
    """One row per trial with its knobs, status, reason and figures (pandas, via Optuna)."""
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration",
                                       "datetime_start"))
    df = df[df["state"] != "WAITING"]  # enqueued but never started
    df = df.rename(columns=lambda c: c.replace("user_attrs_", "").replace("params_", "param_"))
    if "knobs" in df.columns:
        df = df.drop(columns=["knobs"])
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def tune(workload: Workload, options: TuneOptions, progress: Progress | None = None) -> TuneResult:
    """Run one tune; see `Tuner`."""
    return Tuner(workload, options, progress).run()
