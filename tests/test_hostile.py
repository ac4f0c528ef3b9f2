"""Hostile input and faults through the real CLI and the public API: one clear line on stderr,
exit 2 (or the documented code), no traceback, nothing half-written, nothing left running."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, run_cli, wait_until

GOOD = ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 2)\n"
        "def example_inputs(batch_size=1):\n    return (torch.randn(batch_size, 4),)\n")
# forward writes the pid of the process running it (whole, or not at all: renamed into place),
# then never returns (line 7 of the file)
HANG = ("import os, time, torch\nPID_FILE = {pid!r}\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
        "        open(PID_FILE + '.tmp', 'w').write(str(os.getpid()))\n        os.replace(PID_FILE + '.tmp', PID_FILE)\n"
        "        time.sleep(10**6)\n"
        "def build_model():\n    return M()\ndef example_inputs(batch_size=1):\n    return (torch.randn(batch_size, 4),)\n")


def _one_line(res, expected: str, code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("autotiacc: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: only its parent has not reaped it yet
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


class Descendants:
    """Every process below `proc` seen while it runs (polled from a thread): what it started."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        self.proc, self.seen = proc, set()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                self.seen |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
            except psutil.Error:  # it ended meanwhile
                return
            time.sleep(0.02)

    def all_gone(self) -> bool:
        self._thread.join()
        return not any(_alive(pid) for pid in self.seen)


def _interruptible() -> None:
    """As at a terminal: a suite started in the background (`pytest &`) inherits SIGINT ignored,
    and Python then never turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _write(path, text):
    path.write_text(text)
    return path


# -- 1. a hanging forward: the budget bounds it; Ctrl-C says the truth ------------------------------------
@pytest.mark.slow
def test_hanging_forward_ends_within_the_budget(tmp_path):
    """The up-front check of a model whose forward hangs is stopped at the end of the budget, and
    every process the tune started ends with it. (On a loaded machine the check may still be
    starting when the budget ends: the same bound, the same message, so the test does not need
    the forward to have been reached in time.)"""
    pid = tmp_path / "pid"
    model = _write(tmp_path / "m.py", HANG.format(pid=str(pid)))
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "autotiacc.cli", "tune", str(model), "--budget", "15s", "--out",
                             str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    started = Descendants(proc)
    stdout, stderr = proc.communicate(timeout=300)  # a tune not bounded by its budget would hang here
    wall = time.monotonic() - t0
    line = _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                     "(the 15 s --budget) and was stopped")
    assert "did not finish within" in line
    assert wall < 15 + 30, wall  # a budget check: it counts from the command's start; the rest is killing and exiting
    assert not out.exists()
    assert started.seen  # the check's process (and the fork server) ran below the tune
    wait_until("the end of every process the tune started", started.all_gone, limit_s=60)
    assert not pid.exists() or not _alive(int(pid.read_text()))


def test_a_hung_trial_leaves_where_it_was_stuck_in_its_log(tmp_path):
    """A trial stopped at its timeout is recorded failed, and its log says where each of the
    worker's threads was: the user's forward, here."""
    from types import SimpleNamespace

    from autotiacc.engine.rundir import RunDir
    from autotiacc.engine.task import Candidate
    from autotiacc.inference.evaluate import evaluate
    from autotiacc.inference.task import InferenceTask, TuneOptions
    from autotiacc.inference.workload import load_workload

    model = _write(tmp_path / "m.py", HANG.format(pid=str(tmp_path / "pid")))
    task = InferenceTask(load_workload(model), TuneOptions(budget_s=60, out_dir=tmp_path / "run"))
    task.run_dir = RunDir(tmp_path / "run")
    (tmp_path / "run" / "trials").mkdir(parents=True)
    task.start_search()
    try:
        # the worker warmed up first on a model that returns (torch, dynamo and the trial's code
        # imported): the trial's 4 s are then its own, and it reaches the forward in a fraction of them
        warm = task.pool.call(evaluate, load_workload(_write(tmp_path / "good.py", GOOD)), {}, device="cpu",
                              target_s=0.05, warmup_s=0.0, timeout=300)
        assert warm.ok, warm.error
        res = task.evaluate(SimpleNamespace(number=7), Candidate(values={}, label="baseline", key="b", is_baseline=True),
                            timeout=4, best_gain=1.0)
    finally:
        task.close()
    assert res.state == "fail" and res.attrs["status"] == "timeout"
    assert (tmp_path / "pid").exists()  # the trial was in the forward when its time was up
    log = (tmp_path / "run" / "trials" / "0007.log").read_text()
    assert "timeout: no result within 4 s" in log and "m.py\", line 7 in forward" in log, log


@pytest.mark.slow
def test_ctrl_c_before_a_run_dir_claims_nothing_kept(tmp_path):
    pid = tmp_path / "pid"
    model = _write(tmp_path / "m.py", HANG.format(pid=str(pid)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "autotiacc.cli", "tune", str(model), "--budget", "5m", "--out",
                             str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=_interruptible)
    wait_until("the forward running in the check's process", pid.is_file, proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "finished trials are kept" not in err and "nothing was kept" in err, err
    assert "Traceback" not in err
    assert not out.exists()
    wait_until("the end of the forward's process", lambda: not _alive(int(pid.read_text())), limit_s=60)


# -- 2. the user's file ends the process ---------------------------------------------------------------
EXITS = {
    "sys.exit(0) at import": ("import sys\nsys.exit(0)\n" + GOOD, "importing it called sys.exit(0)"),
    "sys.exit(0) in build_model": (GOOD.replace("    return torch.nn.Linear(4, 2)",
                                                "    import sys; sys.exit(0)"), "build_model() called sys.exit(0)"),
    "sys.exit(3) in forward": (GOOD.replace("    return torch.nn.Linear(4, 2)", "    return M()")
                               + "class M(torch.nn.Module):\n    def forward(self, x):\n        import sys; sys.exit(3)\n",
                               "forward() on its example inputs called sys.exit(3)"),
    "os._exit(0) in forward": (GOOD.replace("    return torch.nn.Linear(4, 2)", "    return M()")
                               + "class M(torch.nn.Module):\n    def forward(self, x):\n        import os; os._exit(0)\n",
                               "the process ended while importing it"),
    "sys.exit(0) in traffic()": (GOOD + "def traffic():\n    import sys; sys.exit(0)\n", "traffic() called sys.exit(0)"),
    "forward returns None": (GOOD.replace("    return torch.nn.Linear(4, 2)", "    return M()")
                             + "class M(torch.nn.Module):\n    def forward(self, x):\n        return None\n",
                             "returned NoneType with no tensor in it"),
}


@pytest.mark.parametrize("case", sorted(EXITS))
def test_user_file_exiting_is_one_clear_line(tmp_path, case):
    text, expected = EXITS[case]
    out = tmp_path / "run"
    res = run_cli("tune", str(_write(tmp_path / "m.py", text)), "--budget", "1m", "--out", str(out), "--quiet",
                  timeout=120)
    _one_line(res, expected)
    assert not out.exists()


def _plan_for(tmp_path, **fields):
    from autotiacc.inference.plan import Plan
    from autotiacc.knobs import configs_from_params

    d = Plan(knobs=configs_from_params({}), workload={"name": "m", "kind": "python", "batch_size": 1}).to_dict()
    d.update(fields)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    return path


def test_verify_does_not_pass_when_the_model_exits(tmp_path):
    text = (GOOD.replace("    return torch.nn.Linear(4, 2)", "    return M()")
            + "class M(torch.nn.Module):\n    def forward(self, x):\n        import sys; sys.exit(0)\n")
    res = run_cli("verify", str(_plan_for(tmp_path)), str(_write(tmp_path / "m.py", text)), timeout=120)
    _one_line(res, "called sys.exit(0)")
    assert "verify: OK" not in res.stdout


# -- 3, 5. strategies and plans are checked when they load ------------------------------------------------
@pytest.mark.parametrize("yaml_text, expected", [
    ("name: x\nknobs:\n  runtime:\n    threads: [0, -3]\n", "`threads` got -3"),
    ("name: x\nknobs:\n  execution:\n    backnd: [eager]\n", "did you mean `backend`?"),
    ("name: x\nmax_trial_share: 0\n", "`max_trial_share` got 0"),
])
def test_bad_strategy_is_refused_before_any_work(tmp_path, yaml_text, expected):
    strategy = _write(tmp_path / "s.yaml", yaml_text)
    out = tmp_path / "run"
    res = run_cli("tune", str(_write(tmp_path / "m.py", GOOD)), "--strategy", str(strategy), "--budget", "1m",
                  "--out", str(out), "--quiet", timeout=120)
    line = _one_line(res, expected)
    assert str(strategy) in line
    assert not out.exists()


@pytest.mark.parametrize("fields, expected", [
    ({"fingerprint": "x"}, "`fingerprint` got 'x'"),
    ({"speedup": "fast"}, "`speedup` got 'fast'"),
    ({"knobs": [{"_type": "os.system", "_version": 1, "_data": {}}]}, "unknown _type 'os.system'"),
    ({"knobs": [{"_type": "ExecutionConfig", "_version": 1, "_data": {"freezing": "false"}}]},
     "`freezing` got 'false'"),
])
def test_verify_refuses_a_malformed_plan_naming_the_file(tmp_path, fields, expected):
    plan = _plan_for(tmp_path, **fields)
    res = run_cli("verify", str(plan), str(_write(tmp_path / "m.py", GOOD)), timeout=120)
    line = _one_line(res, expected)
    assert str(plan) in line


# -- 7, 8. damaged run directories, and a report when nothing succeeded -------------------------------------
def _run_dir(tmp_path, trials: str = "number,status,reason,label\n0,failed,RuntimeError: boom,baseline\n"):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"workload": {"name": "m"}, "sessions": [{"started": "now"}]}))
    (d / "trials.csv").write_text(trials)
    return d


def test_report_renders_when_no_trial_succeeded(tmp_path):
    d = _run_dir(tmp_path)
    (d / "plan.json").write_text(json.dumps({"label": "baseline (eager fp32)", "fell_back": True, "note": "none passed"}))
    res = run_cli("report", str(d), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    text = (d / "report.md").read_text()
    assert "RuntimeError: boom" in text and "none passed" in text


@pytest.mark.parametrize("name, content, expected", [
    ("run.json", "{not json", "run.json: cannot be read (JSONDecodeError"),
    ("run.json", "[1, 2]", "run.json: holds a list"),
    ("trials.csv", b"\xff\xfe\x00garbage\x81", "trials.csv: cannot be read (UnicodeDecodeError"),
    ("trials.csv", "a,b\n1,2\n", "trials.csv: has no `number` and `status` columns"),
    ("run.json", '{"sessions": "yesterday"}', "run.json: `sessions` holds a str"),
])
def test_report_on_a_damaged_run_dir_is_one_line(tmp_path, name, content, expected):
    d = _run_dir(tmp_path)
    (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    _one_line(run_cli("report", str(d), timeout=120), expected)
    assert not (d / "report.md").exists()


def test_resume_with_a_damaged_study_db(tmp_path):
    d = _run_dir(tmp_path)
    (d / "study.db").write_bytes(b"this is not sqlite" * 100)
    res = run_cli("tune", str(_write(tmp_path / "m.py", GOOD)), "--budget", "1m", "--out", str(d), "--resume",
                  "--quiet", timeout=120)
    _one_line(res, "study.db is not a readable SQLite database")
    assert sorted(p.name for p in d.iterdir()) == ["run.json", "study.db", "trials.csv"]


@pytest.mark.parametrize("name, content, expected", [
    ("run.json", b"{half", "run.json: cannot be read (JSONDecodeError"),
    ("profile.json", b"\x00\xff not json", "profile.json: cannot be read"),
])
def test_resume_with_a_damaged_state_file(tmp_path, name, content, expected):
    d = _run_dir(tmp_path)
    (d / name).write_bytes(content)
    res = run_cli("tune", str(_write(tmp_path / "m.py", GOOD)), "--budget", "1m", "--out", str(d), "--resume",
                  "--quiet", timeout=180)
    _one_line(res, expected)
    assert (d / name).read_bytes() == content  # left as it was, for the user to restore


# -- 10. a plan never imports the model.py it records ----------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_traffic_plan_apply_never_imports_the_recorded_model_file(tmp_path, version):
    import torch

    from autotiacc.errors import PlanError
    from autotiacc.inference.shapes.buckets import BucketSpec, ShapePlan
    from autotiacc.inference.plan import Plan, load_plan
    from autotiacc.knobs import configs_from_params

    marker = tmp_path / "imported"
    evil = _write(tmp_path / "model.py", f"open({str(marker)!r}, 'w').write('ran')\n"
                  "def pad_inputs(inputs, **dims):\n    return inputs\n")
    spec = BucketSpec(edges={"batch_size": [2], "seq_len": [16]}, axes={"batch_size": [(0, 0)], "seq_len": [(0, 1)]})
    d = Plan(knobs=configs_from_params({}), workload={"file": str(evil)}, shapes=ShapePlan(spec)).to_dict()
    if version == 1:  # version 1 kept the buckets among the extras
        d["schema_version"], d["extra"]["shapes"] = 1, d.pop("shapes")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    plan = load_plan(path)
    assert plan.shapes is not None
    with pytest.raises(PlanError, match=r"pad_inputs=my_model.pad_inputs"):
        plan.apply(torch.nn.Linear(16, 2))
    assert not marker.exists()


# -- 11. smaller ones ----------------------------------------------------------------------------------
def test_bad_storage_url_is_refused_before_profiling(tmp_path):
    out = tmp_path / "run"
    res = run_cli("tune", str(_write(tmp_path / "m.py", GOOD)), "--storage", "bogus://nowhere/db", "--budget", "1m",
                  "--out", str(out), "--quiet", timeout=120)
    _one_line(res, "`--storage`")
    assert not out.exists()


def test_out_pointing_at_a_file(tmp_path):
    target = _write(tmp_path / "results.txt", "mine")
    res = run_cli("tune", str(_write(tmp_path / "m.py", GOOD)), "--budget", "1m", "--out", str(target), "--quiet")
    _one_line(res, "is a file, not a folder")
    assert target.read_text() == "mine"


def test_truncated_pt2_prints_one_line(tmp_path):
    import torch

    full = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)), full)
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    res = run_cli("tune", str(cut), "--input-shape", "1x4", "--budget", "1m", "--out", str(tmp_path / "r"), "--quiet",
                  timeout=120)
    _one_line(res, "not a readable torch.export program")


def test_accuracy_check_fails_an_output_with_no_tensor():
    import torch

    from autotiacc.inference.accuracy import compare_outputs

    rep = compare_outputs([None], [None], tolerance=1e-3)
    assert not rep.ok and "holds no tensor" in rep.reason
    assert compare_outputs([torch.ones(2)], [torch.ones(2)], tolerance=1e-3).ok


def test_budget_too_short_for_the_baseline_says_so_and_suggests_one(tmp_path):
    out = tmp_path / "run"
    # a process's first two forwards are quick (the up-front check's: a loaded machine still gets
    # through it), each later one takes 5 s: the baseline's test batches, warm-up and timing
    # alone need more than the 20 s budget
    slow = GOOD.replace("    return torch.nn.Linear(4, 2)\n", "    return Slow()\n") + (
        "import time\nCALLS = []\nclass Slow(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(4, 2)\n"
        "    def forward(self, x):\n        CALLS.append(1)\n        if len(CALLS) > 2:\n            time.sleep(5.0)\n"
        "        return super().forward(x)\n")
    res = run_cli("tune", str(_write(tmp_path / "m.py", slow)), "--budget", "20s", "--out", str(out), "--quiet",
                  timeout=180)
    line = _one_line(res, "`--budget` of 20s ")  # "ended before the baseline could be measured" or, once
    # the baseline's trial started, "is too small to measure the baseline (it ran Ns without finishing)"
    assert "the baseline" in line and "give --budget " in line and "no candidate passed" not in res.stdout + res.stderr


@pytest.mark.slow
def test_baseline_is_never_pruned_and_run_json_holds_no_password(tmp_path):
    """A prune threshold below 1x would prune the baseline against itself; it is exempt. The
    command recorded in run.json has its storage password redacted."""
    from autotiacc.engine.loop import Search
    from autotiacc.inference.task import InferenceTask, TuneOptions
    from autotiacc.inference.workload import load_workload

    wl = load_workload(_write(tmp_path / "m.py", GOOD))
    # a budget no machine spends: patience ends the search after the baseline and one candidate
    opts = TuneOptions(budget_s=600, out_dir=tmp_path / "run", strategy="quick",
                       command="autotiacc tune m.py --storage postgresql://alice:s3cret@db/x")
    task = InferenceTask(wl, opts)
    # below 1x no YAML may ask for (the strategy check refuses it): every candidate is pruned
    task.strategy.prune_factor, task.strategy.enqueue = 0.01, [{}]
    result = Search(task, opts, patience=2).run()
    import optuna

    study = optuna.load_study(study_name="autotiacc", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    base, *others = [t for t in study.trials if t.user_attrs.get("status") not in (None, "duplicate", "skipped")]
    assert base.number == 0 and base.user_attrs["label"] == "baseline (eager fp32)"
    assert base.user_attrs["status"] == "ok", base.user_attrs
    assert others and all(t.user_attrs["status"] == "pruned" for t in others), [t.user_attrs for t in others]
    assert result.stop == "no gain in 2 trials" and result.plan.fell_back  # the baseline is the plan
    run = (tmp_path / "run" / "run.json").read_text()
    assert "s3cret" not in run and "alice:***@db" in run


# -- training: the same loader rules; its run.json holds no password -------------------------------------
@pytest.mark.parametrize("where, expected", [("import", "importing it called sys.exit(0)"),
                                             ("build_model", "build_model() called sys.exit(0)")])
def test_training_file_exiting_is_one_clear_line(tmp_path, where, expected):
    from ._training_targets import TINY_TRAIN

    text = ("import sys\nsys.exit(0)\n" + TINY_TRAIN if where == "import"
            else TINY_TRAIN.replace("def build_model():\n", "def build_model():\n    import sys; sys.exit(0)\n"))
    out = tmp_path / "run"
    res = run_cli("tune", str(_write(tmp_path / "train.py", text)), "--mode", "train", "--budget", "1m", "--out",
                  str(out), "--quiet", timeout=120)
    _one_line(res, expected)
    assert not (out / "run.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["import", "build_model"])
def test_training_file_hanging_is_bounded_by_the_budget(tmp_path, where):
    from ._training_targets import TINY_TRAIN

    text = ("import time\ntime.sleep(10**6)\n" + TINY_TRAIN if where == "import"
            else TINY_TRAIN.replace("def build_model():\n", "def build_model():\n    import time; time.sleep(10**6)\n"))
    out = tmp_path / "run"
    t0 = time.monotonic()
    # the smallest budget allowed: whatever stage the hang is reached in, the budget bounds it
    res = run_cli("tune", str(_write(tmp_path / "train.py", text)), "--mode", "train", "--budget", "10s", "--out",
                  str(out), "--quiet", timeout=120)
    line = _one_line(res, "(the 10 s --budget)")
    # the check gets what is left of the budget after the command's own start-up
    assert re.search(r"did not finish within [0-9]+ s \(the 10 s --budget\)", line), line
    assert float(re.search(r"within ([0-9]+) s", line).group(1)) <= 10
    assert time.monotonic() - t0 < 60  # the budget plus process starts, not forever
    assert not (out / "run.json").exists()


def test_training_run_json_holds_no_storage_password(tmp_path):
    from autotiacc.engine.loop import Search
    from autotiacc.training.tuner import TrainingTask, TrainTuneOptions
    from autotiacc.training.workload import TrainWorkload

    from ._training_targets import TINY_TRAIN

    wl = TrainWorkload(_write(tmp_path / "train.py", TINY_TRAIN))
    out = tmp_path / "run"
    url = "postgresql://bob:hunter2@db:5432/x"
    opts = TrainTuneOptions(budget_s=60, out_dir=out, storage=url,
                            command=f"autotiacc tune train.py --mode train --storage {url}")
    run = json.dumps(Search(TrainingTask(wl, opts), opts, patience=1).run_record({}, {"name": "train"}))
    assert "hunter2" not in run and run.count("bob:***@db") == 2
