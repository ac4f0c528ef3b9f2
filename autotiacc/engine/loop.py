"""The one search loop, for every task: baseline first, stage-1 seeds, then Optuna ask/tell
under the budget, with patience, duplicate detection and a random draw after a run of
duplicates; at the end the top candidates are re-measured side by side with the baseline and
the winner is kept only if it is faster beyond noise.

Every finished trial is in the Optuna storage and `trials.csv` before the next one starts, so
a tune killed at any point keeps its trials and `--resume` continues the same study (the
trial in flight is measured again).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserInputError
from ..measure import faster_beyond_noise
from . import optuna_compat as compat
from .budget import Budget
from .options import RunOptions
from .rundir import RunDir, write_trials_csv
from .storage import claim, publish_plan, publish_run, record_session, redact
from .status import MEASURED, NOT_TRIALS, TrialStatus
from .status import TrialState as ResultState
from .study import INTERRUPTED, StudySpec, check_same_setup, open_study, record_setup, recover_interrupted
from .task import Candidate, Decision, Task, TrialResult

# The final re-measures a candidate only if its search gain is at least this share of the best's
# (convnet here: the search's ratios ran 0.64-0.82x of the final's, alike for every candidate).
FINAL_WITHIN = 0.6
FINAL_SHARE = 0.2  # the most of the budget the final should take, by the task's estimate
# A replacement worker's start: ~0.05 s forked by the zygote, ~1.5 s importing torch without it
SPAWN_OVERHEAD_S = 2.0
# Kept after the final for plan.json, trials.csv, run.json and the report (its plots took 3.7 s
# on 2 loaded cores): the budget is a bound on the whole command.
END_S = 3.0
RANDOM_AFTER = 3  # duplicates in a row before the next candidate is drawn at random
MAX_SKIPS = 40  # duplicates/skips in a row that mean the space is exhausted
MIN_GAIN = 1.01  # a new best must beat the old one by this factor to reset patience
Progress = Callable[[dict[str, Any]], None]


@dataclass
class SearchResult:
    plan: Any
    run_dir: Path
    n_trials: int
    wall_s: float
    stop: str = ""


class Search:
    """One tune of `task`: construct, then `run()`. Progress events go to `progress`."""

    def __init__(self, task: Task, options: RunOptions, *, patience: int, progress: Progress | None = None) -> None:
        self.task, self.options, self.patience = task, options, patience
        self.progress = progress or (lambda event: None)
        self.budget = (Budget(options.budget_s) if options.started is None
                       else Budget(options.budget_s, t_start=options.started))
        self.spec = StudySpec(storage=options.storage, study_name=options.study_name, direction=task.direction,
                              seed=options.seed, heartbeat_s=options.heartbeat_s, resume=options.resume)
        self.run_dir = RunDir(options.out_dir)
        self.study: Any = None

    def left(self) -> float:
        return self.budget.left()

    # -- set-up ------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        import optuna

        self.task.validate(self.left())  # the user's bugs surface before anything is written
        self.run_dir.open(resume=self.options.resume, shared=self.spec.shared)
        try:
            fp, identity = self.task.fingerprint(), self.task.identity()
            self.tpe = compat.tpe_sampler(self.options.seed)
            self.random = optuna.samplers.RandomSampler(seed=self.options.seed + 1)
            study, created = open_study(self.spec, self.run_dir.file("study.db"), self.tpe)
            self.study = study
            check_same_setup(study, fp, identity)  # before the profile: a wrong resume costs nothing
            self.budget.add("profile_s", self.task.prepare(self.run_dir, self.left()))
            recover_interrupted(study, shared=self.spec.shared)
            record_setup(study, fp, identity, **self.task.study_attrs())
            self.task.opened(study)
            self._start_session(fp, identity)
            if created or (not self.spec.shared and not any(t.state.is_finished() for t in study.trials)):
                for params in self.task.seeds():
                    study.enqueue_trial(params, skip_if_exists=True)
            self.task.start_search()
            stop = self._search(study)
            self.task.end_search(study)
            plan = self._finalize(study)
            n = sum(1 for t in study.trials if t.user_attrs.get("status") not in (None, *NOT_TRIALS))
            result = SearchResult(plan=plan, run_dir=self.run_dir.path, n_trials=n, wall_s=self.budget.elapsed(),
                                  stop=stop)
            write_trials_csv(study, self.run_dir.file("trials.csv"))
            self._end_session(stop=stop, wall_s=result.wall_s, budget=self.budget.summary())
            return result
        finally:
            self.task.close()
            self.run_dir.close()

    # -- the loop ----------------------------------------------------------------------------
    def _search(self, study) -> str:
        shared = self.spec.shared
        seen = self._seen(study, {})
        self.progress({"event": "start", "budget_s": self.options.budget_s, "strategy": self.task.strategy_name,
                       "resumed_trials": len(seen)})
        stale = skips = 0
        best = self._best_gain(study)
        while True:
            left = self.left() - self._reserve(study)
            if left < max(SPAWN_OVERHEAD_S + 2, 0.8 * self._typical_trial_s(study)):
                stop = "budget"
                break
            if stale >= self.patience:
                stop = f"no gain in {stale} trials"
                break
            if skips >= MAX_SKIPS:
                stop = "search space exhausted"
                break
            # TPE ignores failed trials and keeps proposing them again; after a run of duplicates,
            # draw the next candidate at random so the budget goes to configurations not yet seen.
            study.sampler = self.random if skips >= RANDOM_AFTER else self.tpe
            if shared:
                recover_interrupted(study, shared=True)
            trial = study.ask()
            if shared:
                claim(study, trial)
            cand = self._propose(study, trial)
            trial.set_user_attr("knobs", cand.values)
            trial.set_user_attr("label", cand.label)
            trial.set_user_attr("key", cand.key)
            if cand.is_baseline:
                trial.set_user_attr("baseline", True)
            if shared:  # other workers' finished trials count as seen too
                seen = self._seen(study, seen, exclude=trial.number)
            if cand.skip or cand.key in seen:
                self._skip(study, trial, cand.skip, seen.get(cand.key))
                skips += 1
                stale += 0 if cand.skip else 1
                continue
            skips = 0
            seen[cand.key] = trial.number
            self._measure(study, trial, cand, timeout=self.task.trial_timeout(left, self.options.budget_s, cand),
                          best=best)
            new_best = self._best_gain(study)
            stale = 0 if new_best > best * MIN_GAIN else stale + 1
            best = max(best, new_best)
            write_trials_csv(study, self.run_dir.file("trials.csv"))
        self.progress({"event": "search_done", "reason": stop, "left_s": self.left()})
        if shared:
            recover_interrupted(study, shared=True)
        return stop

    def _reserve(self, study) -> float:
        """Time kept for the end: the final's whole plan while that is at most FINAL_SHARE of the
        budget, never less than what it cannot do without (it cuts the rest to what it gets),
        and END_S for the plan and the report."""
        tops = self._final_set(study)
        whole = self.task.final_reserve(tops, pending=True)
        least = self.task.final_reserve(tops, pending=True, least=True)
        return max(least, min(whole, FINAL_SHARE * self.options.budget_s)) + END_S

    def _measure(self, study, trial, cand: Candidate, *, timeout: float, best: float) -> None:
        self.progress({"event": "trial_start", "number": trial.number, "label": cand.label})
        with compat.heartbeat_thread(study, trial):  # a no-op unless the storage has heartbeats on
            result = self.task.evaluate(trial, cand, timeout=timeout, best_gain=best)
        record_trial(study, trial, result)
        self.budget.add_trial(result.attrs)
        if cand.is_baseline:
            self.task.check_baseline(result, self.options.budget_s)
        self.progress({"event": "trial_end", "number": trial.number, "status": result.attrs.get("status"),
                       "speedup": result.attrs.get("speedup"), "reason": result.attrs.get("reason", ""),
                       "build_s": result.attrs.get("build_s"), "best_speedup": self._best_gain(study),
                       "left_s": self.left()})

    @staticmethod
    def _seen(study, seen: dict[str, int], exclude: int | None = None) -> dict[str, int]:
        """Configuration key -> first finished trial with it. Interrupted trials are not seen:
        their configuration is measured again."""
        for t in study.get_trials(deepcopy=False):
            key = t.user_attrs.get("key")
            if key and t.state.is_finished() and t.number != exclude and t.user_attrs.get("status") != INTERRUPTED:
                seen.setdefault(key, t.number)
        return seen

    def _propose(self, study, trial) -> Candidate:
        """The task's candidate for `trial`. A resumed study whose categorical parameters had other
        choices than this run offers cannot go on (Optuna has no dynamic value spaces): one clear
        error instead of Optuna's traceback; the asked trial is failed, nothing else is touched."""
        try:
            return self.task.propose(trial)
        except ValueError as exc:
            if "dynamic value space" not in str(exc):
                raise
            why = ("this study sampled a parameter over other choices than this run offers (another strategy file, "
                   "--level or device, an optional package such as onnxruntime or torchao installed or removed "
                   "since, or an older autotiacc): Optuna cannot continue it over new choices")
            compat.fail_trial(study, trial.number, status=TrialStatus.FAILED, reason=why)
            raise UserInputError(f"{why}. Resume with the same setup, or give another --out.") from None

    def _skip(self, study, trial, reason: str | None, duplicate_of: int | None) -> None:
        from optuna.trial import TrialState

        if reason:
            trial.set_user_attr("status", TrialStatus.SKIPPED.value)
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.PRUNED)
            return
        prev = study.trials[duplicate_of]
        trial.set_user_attr("status", TrialStatus.DUPLICATE.value)
        trial.set_user_attr("reason", f"same configuration as trial {duplicate_of}")
        if prev.state == TrialState.COMPLETE:
            study.tell(trial, prev.value)
        else:
            study.tell(trial, state=TrialState.PRUNED if prev.state == TrialState.PRUNED else TrialState.FAIL)

    def _best_gain(self, study) -> float:
        from optuna.trial import TrialState

        vals = [self.task.gain(t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(vals) if vals else 1.0

    @staticmethod
    def _typical_trial_s(study) -> float:
        """Median wall time of measured trials: don't start one that cannot finish in time."""
        walls = sorted(float(t.user_attrs["wall_s"]) for t in study.trials
                       if t.user_attrs.get("status") in MEASURED and "wall_s" in t.user_attrs)
        return walls[len(walls) // 2] if walls else SPAWN_OVERHEAD_S + 2

    def _is_baseline(self, t) -> bool:
        return bool(t.user_attrs.get("baseline")) or t.user_attrs.get("label") == self.task.baseline_label

    def _tops(self, study) -> list:
        """The best measured candidates faster than the baseline, one per family (`Task.family`),
        the best of each group (`Task.final_group`) first."""
        from optuna.trial import TrialState

        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("status") == TrialStatus.OK and not self._is_baseline(t) and self.task.gain(t.value) > 1.0]
        done.sort(key=lambda t: -self.task.gain(t.value))
        out, keys = [], set()
        for t in done:
            knobs = t.user_attrs.get("knobs")
            k = self.task.family(knobs) if knobs is not None else None
            k = (t.user_attrs.get("key") or repr(t.params)) if k is None else k
            if k not in keys:
                keys.add(k)
                out.append(t)
        groups, firsts = set(), []
        for t in out:
            g = self.task.final_group(t.user_attrs.get("knobs") or {})
            if g is not None and g not in groups:
                groups.add(g)
                firsts.append(t)
        out = firsts + [t for t in out if t not in firsts]  # each stays in gain order
        return self._contenders(out[: self.task.final_top_k], best=self.task.gain(out[0].value) if out else 0.0)

    def _contenders(self, trials: list, *, best: float) -> list:
        """Those of `trials` within FINAL_WITHIN of `best`, the best search gain: one further behind
        could win the final only if the search had misjudged it by more than the final's noise
        guards against, and each costs the final a process and a window per round."""
        return [t for t in trials if self.task.gain(t.value) >= FINAL_WITHIN * best]

    def _final_set(self, study) -> list:
        """What the final re-measures: the top of each family, the task's extra candidates (the
        best full-precision one), those within FINAL_WITHIN of the best; then, while the final
        would take more than FINAL_SHARE of the budget, the lowest-ranked tops but the best are
        left out (a tune of a few minutes must spend them measuring)."""
        tops = self._tops(study)
        best = self.task.gain(tops[0].value) if tops else 0.0  # the first of the tops is the best
        extra = self._contenders(self.task.final_candidates(tops, study.get_trials(deepcopy=False)), best=best)
        while len(tops) > 1 and self.task.final_reserve(tops + extra) > FINAL_SHARE * self.options.budget_s:
            tops = tops[:-1]
        return tops + extra

    # -- the end -----------------------------------------------------------------------------
    def _finalize(self, study) -> Any:
        """Re-measure the top candidates against the baseline; keep the best only if it is
        faster beyond noise, else fall back to the baseline."""
        tops = self._final_set(study)
        decision = Decision("nothing")
        if tops:
            self.progress({"event": "final_start", "candidates": [t.user_attrs.get("label") for t in tops]})
            t0 = time.monotonic()
            timeout = self.left() - END_S  # what is left: the final is cut rather than overrun the budget
            final = (self.task.final(tops, timeout=timeout) if timeout > 0 else
                     "no time was left in the budget for it")
            self.budget.add("final_s", time.monotonic() - t0)
            decision = choose(final, tops)
        plan = self.task.make_plan(decision, study)
        plan.save(self.run_dir.file("plan.json"))
        if self.spec.shared:
            publish_plan(study, plan.to_dict())
        self.progress({"event": "plan", "label": plan.label, "speedup": plan.speedup, "note": plan.note})
        return plan

    # -- durable records ---------------------------------------------------------------------
    def run_record(self, fp: dict, identity: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        """(run.json's fields, this session's record); a storage password never lands in them."""
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "budget_s": self.options.budget_s,
                   "command": redact(self.options.command or "")}
        data = {"mode": self.task.mode, "workload": identity, "fingerprint": fp, **self.task.run_record(),
                "device": self.options.device, "storage": redact(self.options.storage or "") if self.spec.shared
                else "sqlite:///study.db", "study_name": self.options.study_name, **self.options.extra}
        return data, session

    def _start_session(self, fp: dict, identity: dict) -> None:
        data, session = self.run_record(fp, identity)
        self.run_dir.start_session(data, session)
        if self.spec.shared:
            publish_run(self.study, data)
            record_session(self.study, **session)

    def _end_session(self, **fields: Any) -> None:
        self.run_dir.update_session(**fields)
        if self.spec.shared:
            record_session(self.study, **fields)


def choose(final, tops: list) -> Decision:
    """The choice at the end, from the final re-measurement (or its failure: a reason string)."""
    if isinstance(final, str):  # keep the search's best rather than ending with nothing
        return Decision("final_failed", trial=tops[0], reason=final)
    by_number = {t.number: t for t in tops}
    # a task may rank by its own ratio and give its own noise verdict (`ratio`, `faster` in the
    # result: e.g. from windows timed in alternating processes); else the samples decide
    ranked = sorted(((n, timing, res) for n, (status, timing, res) in final.candidates.items()
                     if status == TrialStatus.OK and timing is not None),
                    key=lambda x: x[2].get("ratio", x[1].median / final.baseline.median))
    if not ranked:
        return Decision("all_failed", trial=tops[0], final=final)
    number, timing, res = ranked[0]
    faster = res.get("faster")
    faster = faster_beyond_noise(timing, final.baseline) if faster is None else bool(faster)
    kind = "winner" if faster else "not_faster"
    return Decision(kind, trial=by_number.get(number), final=final, result=res, timing=timing)


def failure_note(trials: list, limit: int = 8) -> str:
    """`Failures: trial N (label): reason | ...` for a plan that kept the baseline."""
    fails = [f"trial {t.number} ({t.user_attrs.get('label')}): {t.user_attrs.get('reason')}"
             for t in trials if t.user_attrs.get("status") not in (None, TrialStatus.OK, TrialStatus.DUPLICATE, TrialStatus.REQUEUED)]
    return "Failures: " + " | ".join(fails[:limit]) if fails else ""


def record_trial(study, trial, result: TrialResult) -> None:
    """Store a trial's figures and reason, then tell Optuna its value (or its final state)."""
    from optuna.trial import TrialState

    for k, v in result.attrs.items():
        if v is not None:
            trial.set_user_attr(k, v)
    if result.state == ResultState.COMPLETE and result.value is not None:
        study.tell(trial, result.value)
    else:
        study.tell(trial, state=TrialState.PRUNED if result.state == ResultState.PRUNED else TrialState.FAIL)
