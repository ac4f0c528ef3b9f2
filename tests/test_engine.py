"""The engine's decisions, checked with a fake task whose timings are scripted: patience,
duplicates, the random draw after duplicates, the final reserve, the choice at the end
(winner kept only beyond noise), resume of an interrupted trial, worker replacement and the
run-directory lock. Real Optuna storage (SQLite in tmp_path), no torch compile; seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from autotiacc.engine.loop import Search, choose
from autotiacc.engine.options import RunOptions
from autotiacc.engine.rundir import RunDir, RunDirLocked
from autotiacc.engine.study import StudySpec, open_study
from autotiacc.engine.task import Candidate, Decision, FinalMeasure, Task, TrialResult
from autotiacc.errors import UserInputError
from autotiacc.measure import Timing

from . import _engine_targets
from .conftest import wait_until

BASE_MS = 10.0


def timing(median_ms: float, n: int = 15, jitter: float = 0.02) -> Timing:
    """Samples spread evenly +-jitter around the median: deterministic, with some noise."""
    return Timing([median_ms * (1 + jitter * (2 * i / (n - 1) - 1)) for i in range(n)])


@dataclass
class FakePlan:
    label: str
    speedup: float | None
    note: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(self.to_dict()))
        return Path(path)


@dataclass
class FakeTask(Task):
    """Space: one categorical `x`. `gains[x]` scripts a trial's speed-up (None: it fails);
    `final_gains[x]` the final re-measurement's (default: the search's); `same` maps an x to
    the configuration it really is (duplicates)."""

    choices: list = field(default_factory=lambda: list(range(6)))
    gains: dict = field(default_factory=dict)
    final_gains: dict = field(default_factory=dict)
    same: dict = field(default_factory=dict)
    reserve: float = 2.0
    empty_reserve: float = 2.0  # the reserve before any candidate is measured
    reserve_per_top: float = 0.0  # added to `reserve` for each candidate the final would re-measure
    final_fails: bool = False
    isolated: dict = field(default_factory=dict)  # x -> action run in a real worker process
    seed_values: list = field(default_factory=lambda: [0])
    log: list = field(default_factory=list)
    final_timeout: float | None = None
    families: dict = field(default_factory=dict)  # x -> its family for the final (default: its own)
    groups: dict = field(default_factory=dict)  # x -> its group for the final (default: none)
    final_xs: list = field(default_factory=list)  # the xs the final re-measured
    direction: str = "minimize"
    mode: str = "fake"
    strategy_name: str = "fake"
    baseline_label: str = "x=0"

    def prepare(self, run_dir, left_s: float) -> float:
        self.run_dir = run_dir
        return 0.0

    def identity(self) -> dict[str, Any]:
        return {"name": "fake", "param_shapes_sha256": "abc", "batch_size": 4}

    def fingerprint(self) -> dict[str, Any]:
        return {"cpu_model": "Fake CPU", "torch": "0.0", "device_name": "fake"}

    def seeds(self) -> list[dict[str, Any]]:
        return [{"x": x} for x in self.seed_values]

    def propose(self, trial) -> Candidate:
        x = trial.suggest_categorical("x", self.choices)
        self.log.append((trial.number, x, type(trial.study.sampler).__name__))
        real = self.same.get(x, x)
        return Candidate(values={"x": real}, label=f"x={real}", key=str(real), is_baseline=real == 0)

    def evaluate(self, trial, candidate: Candidate, *, timeout: float, best_gain: float) -> TrialResult:
        x = candidate.values["x"]
        attrs: dict[str, Any] = {"wall_s": 0.01, "build_s": 0.002, "measure_s": 0.005}
        if x in self.isolated:
            # the trial's own timeout (the budget left): a worker's start on a loaded machine took
            # longer than the 10 s this was capped at, and a crash was recorded as a timeout
            out = self.pool.call(_engine_targets.scripted, self.isolated[x], self.gains.get(x, 1.0), timeout=timeout)
            if not out.ok:
                return TrialResult("fail", attrs={**attrs, "status": out.status, "reason": out.error})
            attrs["pid"] = out.value["pid"]
        gain = 1.0 if x == 0 else self.gains.get(x)
        if gain is None:
            return TrialResult("fail", attrs={**attrs, "status": "failed", "reason": "scripted"})
        return TrialResult("complete", 1 / gain, {**attrs, "status": "ok", "speedup": gain})

    def start_search(self) -> None:
        from autotiacc.engine.workers import WorkerPool

        self.pool = WorkerPool()

    def end_search(self, study) -> None:
        self.workers_started = self.pool.started
        self.pool.close()

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()

    def final_reserve(self, tops: list, *, pending: bool = False, least: bool = False) -> float:
        return self.reserve + self.reserve_per_top * len(tops) if tops else self.empty_reserve

    def family(self, values: dict[str, Any]) -> Any:
        return self.families.get(values["x"])

    def final_group(self, values: dict[str, Any]) -> Any:
        return self.groups.get(values["x"])

    def final(self, tops: list, timeout: float):
        self.final_timeout = timeout
        self.final_xs = [t.user_attrs["knobs"]["x"] for t in tops]
        if self.final_fails:
            return "timeout: scripted"
        cands = {}
        for t in tops:
            x = t.user_attrs["knobs"]["x"]
            g = self.final_gains.get(x, self.gains.get(x, 1.0))
            cands[t.number] = ("ok", timing(BASE_MS / g), {"x": x}) if g else ("failed", None, {"x": x})
        return FinalMeasure(baseline=timing(BASE_MS), candidates=cands)

    def make_plan(self, decision: Decision, study) -> FakePlan:
        x = decision.trial.user_attrs["knobs"]["x"] if decision.trial is not None and not decision.fell_back else 0
        sp = 1.0 if decision.fell_back else (BASE_MS / decision.timing.median if decision.timing else None)
        return FakePlan(label=f"x={x}", speedup=sp, note=decision.reason, kind=decision.kind)


def _run(tmp_path, task: FakeTask, *, patience: int = 30, budget_s: float = 120, resume: bool = False, **kw):
    opts = RunOptions(budget_s=budget_s, out_dir=tmp_path / "run", resume=resume, **kw)
    return Search(task, opts, patience=patience).run()


def _trials(tmp_path):
    import pandas as pd

    return pd.read_csv(tmp_path / "run" / "trials.csv")


def _measured(tmp_path):
    t = _trials(tmp_path)
    return t[~t["status"].isin(["duplicate", "skipped"])].set_index("label")


# -- the search ------------------------------------------------------------------------------------
def test_baseline_first_then_patience_stops_a_search_without_gain(tmp_path):
    task = FakeTask(choices=list(range(50)), gains={x: 0.9 for x in range(1, 50)})
    res = _run(tmp_path, task, patience=4)
    assert res.stop == "no gain in 4 trials"
    t = _trials(tmp_path)
    assert t.iloc[0]["label"] == "x=0" and t.iloc[0]["status"] == "ok"  # the baseline first (seed)
    assert res.plan.kind == "nothing" and res.plan.label == "x=0"  # nothing faster: nothing re-measured
    assert json.loads((tmp_path / "run" / "run.json").read_text())["sessions"][0]["stop"] == res.stop


def test_duplicates_are_recorded_not_measured_and_copy_the_value(tmp_path):
    # x=1..5 are all the same configuration as x=1
    task = FakeTask(gains={1: 1.5}, same={x: 1 for x in range(1, 6)}, seed_values=[0, 1, 2, 3])
    _run(tmp_path, task, patience=6)
    t = _trials(tmp_path)
    measured = t[t["status"] == "ok"]
    assert sorted(measured["label"]) == ["x=0", "x=1"]  # each configuration measured once
    dups = t[t["status"] == "duplicate"]
    assert len(dups) >= 2 and dups["reason"].str.contains("same configuration as trial 1").all()
    assert dups["value"].tolist() == pytest.approx([1 / 1.5] * len(dups))


def test_random_draw_after_three_duplicates_then_exhausted(tmp_path):
    task = FakeTask(choices=[0, 1], gains={1: 1.2})
    res = _run(tmp_path, task, patience=1000)
    assert res.stop == "search space exhausted"
    samplers = [s for _, _, s in task.log]
    t = _trials(tmp_path).set_index("number")
    # after three duplicates in a row every draw is random
    for i, (number, _, sampler) in enumerate(task.log):
        run = [n for n, _, _ in task.log[max(0, i - 3):i]]
        if len(run) == 3 and all(t.loc[n, "status"] == "duplicate" for n in run):
            assert sampler == "RandomSampler", (number, samplers)
    assert "RandomSampler" in samplers and "TPESampler" in samplers
    assert (t["status"] == "ok").sum() == 2


def test_failed_trials_are_recorded_with_reason_and_the_search_goes_on(tmp_path):
    task = FakeTask(gains={1: None, 2: 1.3}, seed_values=[0, 1, 2])
    _run(tmp_path, task, patience=3)
    t = _measured(tmp_path)
    assert t.loc["x=1", "status"] == "failed" and t.loc["x=1", "state"] == "FAIL"
    assert t.loc["x=2", "status"] == "ok"


def test_a_crashed_worker_is_replaced_and_only_its_candidate_fails(tmp_path):
    task = FakeTask(gains={1: 1.2, 2: 1.3, 3: 1.1, 4: 1.15}, seed_values=[0, 1, 4, 2, 3],
                    isolated={1: "ok", 4: "ok", 2: "kill", 3: "ok"})
    _run(tmp_path, task, patience=3)
    t = _measured(tmp_path)
    assert t.loc["x=2", "status"] in ("oom", "crash") and "SIGKILL" in t.loc["x=2", "reason"]
    assert (t.loc[["x=1", "x=4", "x=3"], "status"] == "ok").all()
    assert t.loc["x=1", "pid"] == t.loc["x=4", "pid"]  # one warm worker, candidate after candidate
    assert t.loc["x=3", "pid"] != t.loc["x=1", "pid"]  # replaced after the crash
    assert task.workers_started == 2


def test_budget_too_small_starts_nothing(tmp_path):
    res = _run(tmp_path, FakeTask(empty_reserve=7.0), budget_s=10)  # 3 s left after the reserve: < SPAWN_OVERHEAD_S + 2
    assert res.stop == "budget" and res.n_trials == 0


def test_final_reserve_is_kept_for_the_re_measurement(tmp_path):
    # once a candidate beats the baseline, 117 of the 120 s are reserved: the search stops
    task = FakeTask(choices=list(range(50)), gains={x: 1.0 + x / 10 for x in range(1, 50)}, reserve=117.0,
                    seed_values=[0, 5])
    res = _run(tmp_path, task)
    assert res.stop == "budget" and res.n_trials == 2  # no third trial: the search stopped at once
    assert task.final_timeout is not None and task.final_timeout > 100  # the reserve went to the final


# -- the choice at the end ----------------------------------------------------------------------
def test_winner_kept_only_beyond_noise(tmp_path):
    task = FakeTask(gains={1: 1.5, 2: 1.2}, seed_values=[0, 1, 2])
    res = _run(tmp_path, task, patience=3)
    assert res.plan.kind == "winner" and res.plan.label == "x=1" and res.plan.speedup == pytest.approx(1.5, rel=0.01)


def test_within_noise_falls_back_to_the_baseline(tmp_path):
    # 1.5x in the search, 1.005x in the final re-measurement: noise, keep the baseline
    task = FakeTask(gains={1: 1.5}, final_gains={1: 1.005}, seed_values=[0, 1])
    res = _run(tmp_path, task, patience=3)
    assert res.plan.kind == "not_faster" and res.plan.label == "x=0" and res.plan.speedup == 1.0


def test_the_final_re_measures_the_best_of_each_family(tmp_path):
    """x=1..3 are one family (say bf16 + compile with other thread counts): only the best of
    them is re-measured, beside the best of the other families."""
    task = FakeTask(gains={1: 2.0, 2: 2.2, 3: 2.1, 4: 1.5, 5: 1.4}, families={1: "a", 2: "a", 3: "a"},
                    seed_values=[0, 1, 2, 3, 4, 5])
    _run(tmp_path, task, patience=6)
    assert task.final_xs == [2, 4, 5]  # best first; 1 and 3 lost to 2 inside family "a"
    plain = FakeTask(gains={1: 2.0, 2: 2.2, 3: 2.1, 4: 1.5, 5: 1.4}, seed_values=[0, 1, 2, 3, 4, 5])
    _run(tmp_path / "plain", plain, patience=6)
    assert plain.final_xs == [2, 3, 1]  # without families: every configuration its own


def test_the_final_takes_the_best_of_each_group_before_the_next_families(tmp_path):
    # 1-3 are one group (say compiled), 4 another (say TorchScript): the search ranks groups
    # unfairly, so 4 is re-measured before the third compiled family
    task = FakeTask(gains={1: 3.0, 2: 2.9, 3: 2.8, 4: 2.0}, groups={1: "c", 2: "c", 3: "c", 4: "ts"},
                    seed_values=[0, 1, 2, 3, 4])
    _run(tmp_path, task, patience=5)
    assert task.final_xs == [1, 4, 2]


def test_the_final_leaves_out_the_lowest_ranked_beyond_its_share_of_the_budget(tmp_path):
    from autotiacc.engine.loop import FINAL_SHARE

    # each re-measured candidate costs 10 s of a 120 s budget; the final may take FINAL_SHARE of it
    task = FakeTask(gains={1: 3.0, 2: 2.9, 3: 2.8}, reserve_per_top=10.0, seed_values=[0, 1, 2, 3])
    _run(tmp_path, task, patience=4)
    assert task.final_xs == [1, 2, 3][: int(FINAL_SHARE * 120 // 10)]
    lavish = FakeTask(gains={1: 3.0, 2: 2.9, 3: 2.8}, reserve_per_top=150.0, seed_values=[0, 1, 2, 3])
    _run(tmp_path / "lavish", lavish, budget_s=1000, patience=4)
    assert lavish.final_xs == [1]  # never fewer than the best


def test_a_candidate_far_behind_the_best_is_not_re_measured(tmp_path):
    from autotiacc.engine.loop import FINAL_WITHIN

    # 4 is the best of its family but at 0.5x the best's gain: it could not win the final
    task = FakeTask(gains={1: 3.0, 2: 2.9, 3: 3.0 * FINAL_WITHIN + 0.01, 4: 1.5}, families={1: "a", 2: "a"},
                    seed_values=[0, 1, 2, 3, 4])
    _run(tmp_path, task, patience=5)
    assert task.final_xs == [1, 3]


def test_inference_families_ignore_runtime_settings_and_freezing():
    from autotiacc.inference.task import family_of

    bf16_compile = {"execution": {"backend": "compile", "freezing": True}, "precision": {"mode": "bf16_weights"}}
    same = [bf16_compile,
            {**bf16_compile, "runtime": {"threads": 2, "inference_mode": False}},
            {"execution": {"backend": "compile", "freezing": False}, "precision": {"mode": "bf16_weights"}}]
    assert len({family_of(v) for v in same}) == 1
    other = [{"execution": {"backend": "compile", "compile_mode": "max-autotune"}, "precision": {"mode": "bf16_weights"}},
             {**bf16_compile, "layout": {"channels_last": True}},
             {"execution": {"backend": "onnxruntime"}}, {},
             {**bf16_compile, "precision": {"mode": "bf16_weights", "groups": [["layer1", "fp32"]]}},
             {**bf16_compile, "shapes": {"edges": {"batch_size": [4]}, "padded": [True]}}]
    assert len({family_of(v) for v in same[:1] + other}) == 1 + len(other)


def test_final_failure_keeps_the_search_best(tmp_path):
    task = FakeTask(gains={1: 1.5, 2: 1.2}, seed_values=[0, 1, 2], final_fails=True)
    res = _run(tmp_path, task, patience=3)
    assert res.plan.kind == "final_failed" and res.plan.label == "x=1" and "scripted" in res.plan.note


def test_choose_every_case():
    class T:
        def __init__(self, n):
            self.number = n

    tops = [T(3), T(5)]
    assert choose("crash: x", tops).kind == "final_failed"
    fm = FinalMeasure(timing(10), {3: ("failed", None, {}), 5: ("rejected", None, {})})
    assert choose(fm, tops).kind == "all_failed" and choose(fm, tops).trial.number == 3  # the search's best
    fm = FinalMeasure(timing(10), {3: ("ok", timing(9.0), {}), 5: ("ok", timing(7.0), {})})
    d = choose(fm, tops)
    assert d.kind == "winner" and d.trial.number == 5 and not d.fell_back
    fm = FinalMeasure(timing(10), {3: ("ok", timing(9.95), {})})
    assert choose(fm, tops).kind == "not_faster" and choose(fm, tops).fell_back


# -- resume, lock, records ----------------------------------------------------------------------
def test_trial_running_at_a_kill_is_measured_again_after_resume(tmp_path):
    task = FakeTask(gains={1: 1.3, 2: 1.4}, seed_values=[0])
    _run(tmp_path, task, patience=2)
    # a killed session left trial x=2 RUNNING
    study, _ = open_study(StudySpec(None, "autotiacc", "minimize"), tmp_path / "run" / "study.db", None)
    trial = study.ask()
    trial.suggest_categorical("x", task.choices)
    running = trial.number
    study2, _ = open_study(StudySpec(None, "autotiacc", "minimize"), tmp_path / "run" / "study.db", None)
    frozen = study2.trials[running]
    x_running = frozen.params["x"]
    assert frozen.state.name == "RUNNING"
    task2 = FakeTask(gains={1: 1.3, 2: 1.4, 3: 1.1, 4: 1.2, 5: 1.05}, seed_values=[0])
    _run(tmp_path, task2, patience=2, resume=True)
    t = _trials(tmp_path).set_index("number")
    assert t.loc[running, "status"] == "interrupted" and t.loc[running, "state"] == "FAIL"
    again = t[t["retry_of"] == running]
    assert len(again) == 1 and again.iloc[0]["label"] == f"x={x_running}"
    assert again.iloc[0]["status"] in ("ok", "duplicate")  # measured, or a copy of an earlier measurement
    if again.iloc[0]["status"] == "duplicate":  # never a duplicate of the interrupted record itself
        assert f"trial {running}" not in again.iloc[0]["reason"]
    assert not (t["state"] == "RUNNING").any()


def test_the_interrupted_trial_runs_before_starting_points_never_reached(tmp_path):
    _run(tmp_path, FakeTask(gains={1: 1.3}, seed_values=[0]), patience=1)
    # a killed session had queued three starting points and was measuring the first
    study, _ = open_study(StudySpec(None, "autotiacc", "minimize"), tmp_path / "run" / "study.db", None)
    for x in (3, 4, 5):
        study.enqueue_trial({"x": x})
    running = study.ask()
    x_running = running.suggest_categorical("x", list(range(6)))
    assert x_running == 3
    task = FakeTask(gains={1: 1.3, 3: 1.1, 4: 1.2, 5: 1.05}, seed_values=[0])
    # patience 1: the resumed search stops after the first trial without gain, so only what runs first counts
    _run(tmp_path, task, patience=1, resume=True)
    t = _trials(tmp_path).set_index("number")
    retry = t[t["retry_of"] == running.number]
    assert len(retry) == 1 and retry.iloc[0]["label"] == "x=3" and retry.iloc[0]["status"] == "ok"
    later = t[(t.index > running.number) & (t["label"].isin(["x=4", "x=5"]))]
    assert (later.index > retry.index[0]).all()  # the retry was measured first
    assert "requeued" not in set(t["status"].dropna())  # the moved queue entries are not trials


def test_resume_with_another_batch_size_is_refused(tmp_path):
    _run(tmp_path, FakeTask(seed_values=[0]), patience=1)

    class Other(FakeTask):
        def identity(self):
            return {"name": "fake", "param_shapes_sha256": "abc", "batch_size": 8}

    with pytest.raises(UserInputError, match="batch size 4; this run asks for 8"):
        _run(tmp_path, Other(seed_values=[0]), patience=1, resume=True)
    with pytest.raises(UserInputError, match="already holds a tune; add --resume"):
        _run(tmp_path, FakeTask(seed_values=[0]), patience=1)


def test_a_locked_run_directory_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    code = ("import sys, time; from autotiacc.engine.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
            "print('locked', flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on "):
            _run(tmp_path, FakeTask())
        assert not (d / "run.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    res = _run(tmp_path, FakeTask(seed_values=[0]), patience=1)
    assert res.n_trials >= 1
    rd = RunDir(d)
    rd.lock()  # released at the end of the tune
    rd.close()


def test_run_json_records_where_the_budget_went(tmp_path):
    _run(tmp_path, FakeTask(gains={1: 1.5}, seed_values=[0, 1]), patience=2, command="autotiacc tune m.py "
         "--storage postgresql://u:secret@h/db")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    b = run["sessions"][0]["budget"]
    assert set(b) == {"profile_s", "build_s", "timing_s", "trial_other_s", "final_s", "other_s", "wall_s"}
    assert b["build_s"] > 0 and b["timing_s"] > 0
    assert sum(v for k, v in b.items() if k != "wall_s") == pytest.approx(b["wall_s"], abs=0.05)
    assert "secret" not in run["sessions"][0]["command"]
    from autotiacc.report.budget import budget_lines

    (line,) = budget_lines(run["sessions"])
    outside = 100 * (b["profile_s"] + b["final_s"] + b["other_s"]) / b["wall_s"]
    assert f"outside the trials (profile, final re-measurement, the rest): {outside:.0f} %" in line


def test_shared_storage_fails_only_a_dead_peers_trial_and_queues_it_again(tmp_path):
    """With `--storage` (any RDB URL; SQLite here) a peer's trial is failed only once its worker
    stops sending heartbeats; a live peer's trial is left alone. Every task gets this."""
    from autotiacc.engine.optuna_compat import heartbeat_thread, stale_trial_ids, trial_id
    from autotiacc.engine.storage import claim
    from autotiacc.engine.study import recover_interrupted

    spec = StudySpec(f"sqlite:///{tmp_path / 'shared.db'}", "shared", "minimize", heartbeat_s=1)
    study, created = open_study(spec, None, None)
    assert created
    live, dead = study.ask(), study.ask()
    for t in (live, dead):
        t.suggest_categorical("x", [0, 1, 2])
        claim(study, t)
    with heartbeat_thread(study, live):  # the live worker beats; the dead one stopped after its claim
        # wait for the storage to call the dead one stale (its grace, 3 beats, is then past for
        # both claims: only the beating thread keeps the live one in)
        wait_until("the dead trial's heartbeat going stale", lambda: trial_id(dead) in stale_trial_ids(study))
        failed = recover_interrupted(study, shared=True)
    assert failed == [dead.number]
    trials = study.get_trials(deepcopy=False)
    assert trials[live.number].state.name == "RUNNING"
    assert trials[dead.number].state.name == "FAIL" and trials[dead.number].user_attrs["status"] == "interrupted"
    again = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(again) == 1 and again[0].state.name == "WAITING"
    assert again[0].system_attrs["fixed_params"] == trials[dead.number].params


def test_a_trial_killed_before_its_suggestions_is_queued_again_with_its_whole_configuration(tmp_path):
    """A kill can land between `ask` and the last `suggest`: the RUNNING trial then holds only
    some of its params (none here). An enqueued starting point still keeps all of them; the
    resume measures that configuration again, ahead of the starting points never reached."""
    from autotiacc.engine.study import recover_interrupted

    spec = StudySpec(None, "own", "minimize")
    study, _ = open_study(spec, tmp_path / "study.db", None)
    study.enqueue_trial({"x": 1, "y": "b"})
    study.enqueue_trial({"x": 2, "y": "a"})  # a seed the killed session never reached
    killed = study.ask()  # RUNNING, no suggestion yet
    assert killed.params == {}
    assert recover_interrupted(study, shared=False) == [killed.number]
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"x": 1, "y": "b"}, {"x": 2, "y": "a"}]
    assert waiting[0].user_attrs["retry_of"] == killed.number
    nxt = study.ask()
    assert (nxt.suggest_int("x", 0, 3), nxt.suggest_categorical("y", ["a", "b"])) == (1, "b")


def test_profile_is_reused_across_runs_of_the_same_workload_and_machine(tmp_path, monkeypatch):
    from autotiacc.profiling.cache import cached_profile

    monkeypatch.setenv("AUTOTIACC_CACHE_DIR", str(tmp_path / "cache"))
    ident = {"kind": "module", "param_shapes_sha256": "abc", "input_shapes": [[8, 3]], "batch_size": 8}
    fp = {"cpu_model": "Fake CPU", "torch": "0.0", "device_name": "fake"}
    good = {"modules": [{"path": "fc"}], "sensitivity": [], "unavailable": []}

    def run(name, identity=ident, fingerprint=fp, profile=good, resume=False):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        with cached_profile(d, identity, fingerprint, key_extra=[1], resume=resume) as found:
            start = found.start
            if not found.reuse:
                (d / "profile.json").write_text(json.dumps(profile))
        return found.reuse, json.loads((d / "profile.json").read_text()), start

    assert run("a")[:2] == (False, good)  # profiled, then cached
    reused, prof, _ = run("b")
    assert reused and prof["modules"] == good["modules"]  # the same workload and machine: reused
    assert run("c", identity={**ident, "batch_size": 16})[0] is False  # another input: profiled again
    assert run("d", fingerprint={**fp, "torch": "9.9"})[0] is False  # another machine/software
    failed = {**good, "unavailable": ["the profile (timeout: no result); per-layer precision not searched"]}
    assert run("e", identity={**ident, "kind": "x"}, profile=failed)[0] is False
    assert run("f", identity={**ident, "kind": "x"})[0] is False  # a failed profile was not kept
    assert run("a", resume=True)[0] is True  # --resume keeps the run's own profile
    # a profile cut at its share is kept as partial and handed to the next run to complete
    done = {"path": "fc", "sensitivity": {"bf16_weights": {"ok": True}}}
    cut = {**good, "partial": "sensitivity: 1 of 2 groups not fully analysed",
           "sensitivity": [done, {"path": "g", "sensitivity": {}, "skipped": "not analysed"}]}
    partial = {**ident, "kind": "p"}
    reused, _, start = run("g", identity=partial, profile=cut)
    assert reused is False and start is None
    reused, _, start = run("h", identity=partial, profile={**cut, "sensitivity": []})  # less done: not filed
    assert reused is False and start == cut  # the next run starts from the cut profile
    assert run("i", identity=partial)[2] == cut  # still the cut one: the run above did less
    reused, _, start = run("j", identity=partial)
    assert reused is True and start is None  # "i" completed it: reused as it is from now on
