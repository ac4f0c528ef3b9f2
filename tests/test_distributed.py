"""Several workers on one PostgreSQL study: real server, real worker processes, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import wait_until
from .postgres_server import start_or_find_postgres

ROOT = Path(__file__).resolve().parents[1]
TINY = '''
import os
import time

import torch
from torch import nn


class Held(nn.Sequential):
    """In a worker started with AUTOTIACC_TEST_HOLD=FILE, the first forward run inside a trial (a
    trial log in AUTOTIACC_TEST_TRIALS) writes FILE and never returns: that worker is killed while
    a trial of its is in flight, however fast or slow the machine."""

    def forward(self, x):
        held, trials = os.environ.get("AUTOTIACC_TEST_HOLD"), os.environ.get("AUTOTIACC_TEST_TRIALS")
        if held and os.path.isdir(trials) and any(n[:4].isdigit() for n in os.listdir(trials)):
            open(held, "w").close()
            while True:
                time.sleep(0.05)
        return super().forward(x)


def build_model():
    return Held(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

def example_inputs(batch_size: int = 2):
    return (torch.randn(batch_size, 3, 8, 8),)
'''


@pytest.fixture(scope="module")
def pg_url():
    yield from start_or_find_postgres()


@pytest.fixture()
def tiny(tmp_path) -> Path:
    p = tmp_path / "tiny.py"
    p.write_text(TINY)
    return p


def _study_name(tag: str) -> str:
    return f"t-{tag}-{os.getpid()}-{time.time_ns() % 10**9}"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _worker(file: Path, url: str, study: str, out: Path, budget: str, hold: Path | None = None) -> subprocess.Popen:
    """A tune joining the study; with `hold`, its first trial's forward writes that file and waits (see TINY)."""
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", str(file), "--budget", budget, "--strategy", "quick",
           "--storage", url, "--study", study, "--out", str(out), "--quiet", "--heartbeat", "1"]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - the child writes it; closed with the process
    env = _env() if hold is None else {**_env(), "AUTOTIACC_TEST_HOLD": str(hold),
                                       "AUTOTIACC_TEST_TRIALS": str(out / "trials")}
    # own session: kill -9 takes the worker and its trial process, as when a machine dies
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _load(url: str, study: str):
    import optuna

    from autotiacc.engine.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(url))


def test_concurrent_creators_exactly_one_creates(pg_url):
    from autotiacc.engine.storage import create_or_load, open_storage

    name, created, errors = _study_name("create"), [], []

    def start():
        try:
            created.append(create_or_load(open_storage(pg_url), name, None)[1])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(created) == [False, False, False, True]


def test_worker_on_other_hardware_or_batch_size_is_refused(pg_url, tiny, tmp_path):
    from autotiacc.engine.study import StudySpec, check_same_setup, open_study, record_setup
    from autotiacc.errors import UserInputError
    from autotiacc.hardware import fingerprint
    from autotiacc.inference.workload import load_workload

    identity = load_workload(tiny).identity()
    spec = StudySpec(storage=pg_url, study_name=_study_name("fp"), direction="minimize")
    first, created = open_study(spec, None, None)
    assert created
    record_setup(first, fingerprint("cpu"), identity)
    second, created = open_study(spec, None, None)
    assert not created
    other = dict(fingerprint("cpu"), torch="1.0.0", cpu_model="Some Other CPU")
    with pytest.raises(UserInputError, match="torch: plan has .* this machine has '1.0.0'"):
        check_same_setup(second, other, identity)
    with pytest.raises(UserInputError, match="batch size"):
        check_same_setup(second, fingerprint("cpu"), {**identity, "batch_size": 64})
    check_same_setup(second, fingerprint("cpu"), identity)  # the same machine and workload join fine


def test_report_from_storage_unknown_study(pg_url, tmp_path):
    cmd = [sys.executable, "-m", "autotiacc.cli", "report", "--storage", pg_url, "--study", "no-such-study",
           "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "`--study` 'no-such-study' is not in" in proc.stderr


def test_unreachable_storage_is_one_clear_line_without_the_password(tiny, tmp_path):
    cmd = [sys.executable, "-m", "autotiacc.cli", "tune", str(tiny), "--budget", "30s", "--out", str(tmp_path / "o"),
           "--storage", "postgresql://user:s3cret@127.0.0.1:1/db", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "`--storage` postgresql://user:***@127.0.0.1:1/db cannot be opened" in proc.stderr
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_workers_one_killed(pg_url, tiny, tmp_path):
    """Two workers start at once; one is killed -9 mid-trial and a replacement joins. The dead
    worker's trial is failed via heartbeats; both live workers finish their budget; nothing is
    lost or duplicated, and the report renders the same from anywhere."""
    from optuna.trial import TrialState

    from autotiacc.strategy import load_strategy

    name = _study_name("two")
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    held = tmp_path / "b-held"
    a = _worker(tiny, pg_url, name, out_a, "45s")
    b = _worker(tiny, pg_url, name, out_b, "45s", hold=held)  # held inside its first trial until killed
    c = None
    try:
        wait_until("worker B held inside a trial", held.exists, proc=b)
        mine = [t for t in _load(pg_url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker", "").endswith(f":{b.pid}")]
        assert len(mine) == 1 and (out_b / "trials" / f"{mine[0].number:04d}.log").exists(), mine
        killed_trial = mine[0].number
        os.killpg(b.pid, signal.SIGKILL)
        c = _worker(tiny, pg_url, name, out_c, "45s")  # a replacement joins the running study
        assert a.wait(timeout=200) == 0, out_a.with_suffix(".log").read_text()[-3000:]
        assert c.wait(timeout=200) == 0, out_c.with_suffix(".log").read_text()[-3000:]
    finally:
        for p in (a, b, c):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    study = _load(pg_url, name)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no gaps, no duplicated numbers
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]  # none left running forever
    dead = trials[killed_trial]
    assert dead.state == TrialState.FAIL and dead.user_attrs["status"] == "interrupted"
    assert "heartbeats" in dead.user_attrs["reason"]

    # Every trial a worker ran is in the study once, taken by exactly that worker.
    ran = {p.pid: {int(f.stem) for f in (out / "trials").glob("[0-9]*.log")}
           for p, out in ((a, out_a), (b, out_b), (c, out_c))}
    assert all(ran.values())
    assert sum(len(r) for r in ran.values()) == len(set().union(*ran.values()))  # no trial run twice
    for t in trials:
        for pid, numbers in ran.items():
            if t.number in numbers:
                assert t.user_attrs["worker"].endswith(f":{pid}") and t.state.is_finished()
    measured = {t.number for t in trials if "wall_s" in t.user_attrs}
    assert measured <= set().union(*ran.values())  # no figure without a worker that measured it

    # Seeds enqueued once although both workers started together.
    seeds = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in trials
             if "fixed_params" in t.system_attrs and "retry_of" not in t.user_attrs]  # a retry repeats one
    assert len(seeds) == len(set(seeds)) >= len(load_strategy("quick").enqueue)  # + per-layer precision seeds

    # Best is consistent: the study's best is the best complete trial, and the plan knows it.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and study.best_value == min(t.value for t in complete)
    last = max((out_a, out_c), key=lambda out: (out / "plan.json").stat().st_mtime)
    plan_last = json.loads((last / "plan.json").read_text())
    assert study.user_attrs["plan"]["knobs"] == plan_last["knobs"]
    for out in (out_a, out_c):  # both live workers finished their budget with a plan
        assert json.loads((out / "run.json").read_text())["sessions"][-1]["stop"]

    # The last worker's trials.csv has every trial; the report renders identically from storage.
    import pandas as pd

    assert len(pd.read_csv(last / "trials.csv")) == len([t for t in trials if t.state != TrialState.WAITING])
    reports = []
    for where in ("from-a", "from-b"):
        cmd = [sys.executable, "-m", "autotiacc.cli", "report", "--storage", pg_url, "--study", name,
               "--out", str(tmp_path / where)]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        reports.append((tmp_path / where / "report.md").read_text())
    assert reports[0] == reports[1]
    assert "interrupted" in reports[0] and plan_last["label"] in reports[0]
