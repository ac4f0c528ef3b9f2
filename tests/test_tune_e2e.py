"""Whole tunes through the real CLI: budget honoured, artifacts written, resume after kill -9.
`optimize()` as a drop-in callable is checked from its callers in test_optimize_main."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import autotiacc
from autotiacc.profiling.cache import cache_root
from autotiacc.inference.workload import load_workload

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_tune_branchy_model_end_to_end(tmp_path, models_dir):
    """Data-dependent control flow: traced candidates must be rejected, the plan must be right."""
    out = tmp_path / "run"
    budget = 45
    t0 = time.monotonic()
    res = run_cli("tune", str(models_dir / "branchy.py"), "--budget", f"{budget}s", "--strategy", "quick",
                  "--out", str(out), "--quiet", timeout=300)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert wall <= budget + 20, f"budget {budget}s, took {wall:.0f}s"
    for name in ("plan.json", "trials.csv", "report.md", "report.html", "study.db", "run.json", "history.png"):
        assert (out / name).exists(), name
    # the workers' inductor caches live in the user cache folder (this session's), kept for the next tunes
    assert (cache_root() / "inductor").is_dir() and not (out / "cache").exists()
    trials = pd.read_csv(out / "trials.csv")
    measured = trials[trials["status"] != "duplicate"]
    by_label = dict(zip(measured["label"], measured["status"]))
    assert by_label["baseline (eager fp32)"] == "ok"
    assert by_label["backend=torchscript"] == "rejected"  # traced one branch only
    assert "relative error" in trials.loc[trials["label"] == "backend=torchscript", "reason"].iloc[0]
    plan = autotiacc.load_plan(out / "plan.json")
    assert plan.knobs["execution"].backend not in ("torchscript", "onnxruntime")
    _assert_the_plan_says_how_it_was_chosen(plan)
    w = load_workload(models_dir / "branchy.py")
    model = w.build_model()
    fast = plan.apply(w.build_model())
    for x, _ in w.test_data():
        assert torch.allclose(fast(*x), model(*x), rtol=0.05, atol=0.05)
    report = (out / "report.md").read_text()
    assert "backend=torchscript" in report and "rejected" in report and "fingerprint" in report
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained

    (out / "report.md").unlink()
    res = run_cli("report", str(out))
    assert res.returncode == 0 and (out / "report.md").exists()

    exp = tmp_path / "exp.csv"
    exp.write_text("model,batch,variant,median_ms,p90_ms,spread,speedup_vs_eager,rel_err,setup_s\n"
                   "branchy,4,eager fp32,2.0,2.2,0.1,1.0,0,0\nbranchy,4,onnxruntime,1.0,1.1,0.1,2.0,1e-7,0.3\n")
    res = run_cli("compare", str(out), str(exp), "--out", str(tmp_path / "cmp"))
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert set(table["source"]) == {"run", "exp"} and len(table) == 4
    assert table.loc[table["variant"] == "onnxruntime", "speedup"].iloc[0] == 2.0
    for name in ("speedup.png", "pareto.png", "histories.png", "cost.png", "compare.html"):
        assert (tmp_path / "cmp" / name).exists(), name
    res = run_cli("compare", str(tmp_path / "nothing-here"))
    assert res.returncode == 2 and "neither a run directory" in res.stderr


def _assert_the_plan_says_how_it_was_chosen(plan) -> None:
    """A winner's headline names its noise (what each round of the final gave); a plan that keeps
    the baseline says why, at 1.0x: nothing beat it in the search, or the final found it not
    faster beyond noise (whose rounds are kept too)."""
    alt = plan.extra.get("final_alternating")
    if not plan.fell_back:
        # the plan's figure is 1 / (1 / the final's): equal but for the last bits
        lo, hi = next(r for n, r in alt["speedup_range"].items() if alt["speedup"][n] == pytest.approx(plan.speedup))
        assert 0 < lo <= hi and f"{alt['rounds']} rounds, {lo:.2f}x to {hi:.2f}x each" in plan.note
        return
    assert plan.speedup == 1.0
    if alt is None:
        assert plan.note.startswith("no candidate beat the baseline"), plan.note
    else:
        assert "not faster beyond noise" in plan.note or "failed the final" in plan.note, plan.note
        assert alt["rounds"] >= 4 and all(lo <= hi for lo, hi in alt["speedup_range"].values())


def test_a_winning_plan_names_the_noise_of_its_final(tmp_path, models_dir, monkeypatch):
    """A setup where a candidate wins by construction: eager calls sleep 10 ms per layer, a traced
    TorchScript copy never does. One thread per process: on a loaded machine a parallel region
    waits for a descheduled thread (a 0.05 ms TorchScript call took 60-100 ms here)."""
    monkeypatch.setenv("AUTOTIACC_TEST_SLOW_EAGER_S", "0.01")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    res = run_cli("tune", str(models_dir / "slow_lowered.py"), "--strategy", str(models_dir / "short_strategy.yaml"),
                  "--level", "0", "--budget", "5m", "--out", str(out), "--quiet", timeout=600)
    assert res.returncode == 0, res.stderr
    plan = autotiacc.load_plan(out / "plan.json")
    assert not plan.fell_back and plan.knobs["execution"].backend == "torchscript" and plan.speedup > 2, plan.note
    _assert_the_plan_says_how_it_was_chosen(plan)
    lo, _ = next(iter(plan.extra["final_alternating"]["speedup_range"].values()))
    assert lo > 2  # every round of the final: the sleeps are in eager's calls only


def _finished(out) -> pd.DataFrame:
    try:
        t = pd.read_csv(out / "trials.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()
    return t[t["state"] == "COMPLETE"]


def _study_in_flight(db, *, finished: int) -> bool:
    """True when the study holds `finished` COMPLETE trials and one RUNNING (read with sqlite3:
    cheap enough to poll while the tuner writes)."""
    import sqlite3

    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            states = [s for (s,) in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:  # not created yet, or locked for a moment
        return False
    return states.count("COMPLETE") >= finished and "RUNNING" in states


HELD_FORWARD = '''

class Held(nn.Module):
    """tiny_mlp, whose forward, in a tune started with AUTOTIACC_TEST_HOLD set, waits once the study
    STUDY holds 3 finished (COMPLETE) trials, until the file RELEASE exists, having said so in HELD:
    the tune is held inside its next trial, an event the test waits on instead of racing a clock (a
    tune of tiny trials ends between two polls)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.checked = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import sqlite3
        import time

        hold = os.environ.get("AUTOTIACC_TEST_HOLD") and not os.path.exists(RELEASE)
        if hold and time.monotonic() - self.checked > 0.02:
            self.checked = time.monotonic()
            try:
                with sqlite3.connect(f"file:{STUDY}?mode=ro", uri=True, timeout=1) as con:
                    done = con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            except sqlite3.Error:
                done = 0
            while done >= 3 and not os.path.exists(RELEASE):
                open(HELD, "w").close()
                time.sleep(0.05)
        return self.inner(x)


_build = build_model


def build_model() -> nn.Module:
    return Held(_build())
'''


def _wait_for(what: str, condition, proc, *, limit_s: float = 600) -> None:
    """Wait for an event of the tune (a file, the study's state); `limit_s` only guards against a
    tune that never gets there (a bug), never paces the test."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"the tune exited (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s:.0f} s"
        time.sleep(0.05)


def test_kill_minus_nine_then_resume_keeps_every_finished_trial(tmp_path, models_dir):
    """kill -9 of the tuner mid-trial loses no finished trial; the run directory is locked while it
    runs (a second tune is refused, naming the holder); --resume refuses another batch size and
    measures the interrupted trial's configuration again."""
    out = tmp_path / "run"
    release, held = tmp_path / "release", tmp_path / "held"
    # tiny_mlp, held inside its 4th measured trial: the kill lands while a trial is in flight,
    # however fast, slow or loaded the machine
    model = tmp_path / "held_mlp.py"
    model.write_text((models_dir / "tiny_mlp.py").read_text() + HELD_FORWARD
                     + f"\nSTUDY, RELEASE, HELD = {str(out / 'study.db')!r}, {str(release)!r}, {str(held)!r}\n")
    model = str(model)
    # cheap candidates with short windows; patience ends the resumed session (the budgets are bounds)
    strategy = ("--strategy", str(models_dir / "resume_strategy.yaml"))
    # a budget the kill always comes well within: the search is still asking trials then
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", model, *strategy, "--budget", "20m", "--out", str(out),
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "AUTOTIACC_TEST_HOLD": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for("run.json", (out / "run.json").exists, proc)
    second = run_cli("tune", model, *strategy, "--budget", "1m", "--out", str(out), "--resume", "--quiet", timeout=120)
    assert second.returncode == 2 and f"pid {proc.pid} on " in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    # the tune holds itself once the study has 3 finished trials: kill it while a trial is held in
    # flight (its forward waits, HELD is written, and the study has it RUNNING)
    _wait_for("a trial held in flight", lambda: held.exists() and _study_in_flight(out / "study.db", finished=3),
              proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    release.touch()
    import optuna

    # what was in flight is what the study says was RUNNING at the kill (the files lag behind it)
    killed_study = optuna.load_study(study_name="autotiacc", storage=f"sqlite:///{out / 'study.db'}")
    in_flight = next((t.number for t in killed_study.trials if t.state.name == "RUNNING"), None)
    before = _finished(out)
    assert len(before) >= 3, "the tune did not get 3 trials done before the kill"
    assert in_flight is not None and in_flight not in set(before["number"])
    assert not (out / "plan.json").exists()

    res = run_cli("report", str(out))  # a partial run still renders
    assert res.returncode == 0 and "No plan yet" in (out / "report.md").read_text()

    res = run_cli("tune", model, *strategy, "--budget", "40s", "--out", str(out), "--resume", "--batch-size", "7",
                  "--quiet")
    assert res.returncode == 2 and "batch size" in res.stderr and "Traceback" not in res.stderr

    res = run_cli("tune", model, *strategy, "--budget", "30s", "--out", str(out), "--resume", "--quiet", timeout=300)
    assert res.returncode == 0, res.stderr
    after = pd.read_csv(out / "trials.csv")
    kept = after.set_index("number").loc[before["number"]]
    assert (kept["state"] == "COMPLETE").all()
    assert list(kept["value"]) == pytest.approx(list(before["value"]))
    assert len(after) > len(before)
    assert not (after["state"] == "RUNNING").any()  # the killed trial is marked, not left running
    killed = after.set_index("number").loc[in_flight]
    assert killed["status"] == "interrupted" and killed["state"] == "FAIL"
    # its configuration is queued again (before the stage-1 seeds not yet run), never taken for a
    # duplicate of the interrupted record
    study = optuna.load_study(study_name="autotiacc", storage=f"sqlite:///{out / 'study.db'}")
    again = [t for t in study.trials if t.user_attrs.get("retry_of") == in_flight]
    assert len(again) == 1, "the interrupted configuration was not queued again"
    # the configuration in flight: a seed's fixed params (all fields; the trial suggests only those
    # that apply) and what it had suggested when killed (maybe not all)
    killed_trial = study.trials[in_flight]
    in_flight_config = {**killed_trial.system_attrs.get("fixed_params", {}), **killed_trial.params}
    assert again[0].params.items() <= in_flight_config.items() or again[0].state.name == "WAITING"
    assert f"trial {in_flight}" not in str(again[0].user_attrs.get("reason", ""))
    assert (out / "plan.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert len(run["sessions"]) == 2 and set(run["sessions"][-1]["budget"]) >= {"profile_s", "timing_s", "final_s"}
    assert "Where the budget went" in (out / "report.md").read_text()
    res = run_cli("tune", model, *strategy, "--budget", "40s", "--out", str(out), "--quiet")
    assert res.returncode == 2 and "--resume" in res.stderr  # never silently overwrites a tune
