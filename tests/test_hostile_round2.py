"""A second hostile round, as a new user would try it (issue 18): inference and training files,
CLI flags, saved models and plan files. Every wrong input is one line naming the cause (and the
fix), exit 2, and nothing written: the up-front check of the contract refuses it in seconds,
before the run directory exists, so a fixed file re-runs on the same `--out`.

The CLI runs in this process (typer's runner): the user's code runs only in the check's child,
and the zygote's forks make each case about a second. The few cases that need a tune are `slow`
and run the real command in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from autotiacc.cli import app

from .conftest import ROOT

HEAD = "import torch\nfrom torch import nn\n"
INPUTS = "def example_inputs(batch_size=1):\n    return (torch.randn(batch_size, 4),)\n"
LINEAR = HEAD + "def build_model():\n    return nn.Linear(4, 2)\n" + INPUTS


def forward(body: str, extra: str = "") -> str:
    """A model.py whose forward is `body` (x is the input, self.lin a Linear(4, 2))."""
    return (HEAD + "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            f"        self.lin = nn.Linear(4, 2)\n{extra}    def forward(self, x):\n        {body}\n"
            "def build_model():\n    return M()\n" + INPUTS)


def with_test_data(body: str) -> str:
    return LINEAR + f"def test_data():\n    {body}\n"


def metric(body: str) -> str:
    batches = with_test_data("return [((torch.randn(2, 4),), torch.tensor([0, 1]))]")
    return batches + f"def metric(out, y):\n    {body}\n"


DISAGREE = "two forwards on the same inputs disagree"
# The "silent wrong results" and "user errors found only after the budget is spent",
# then the rest of the round: (model.py, extra flags, what the one line must say).
INFERENCE = {
    "all-NaN model": (forward("return self.lin(x) * float('nan')"), [], "holds no finite value"),
    "all -inf output": (forward("return self.lin(x) - float('inf')"), [], "holds no finite value"),
    "test_data() returns []": (with_test_data("return []"), [], "test_data() gave no batch"),
    "test_data() with wrong shapes": (
        with_test_data("return [((torch.randn(2, 4),), None), ((torch.randn(2, 5),), None)]"), [],
        "test batch 1 (input shapes [2, 5])"),
    "test_data() batch that is all NaN": (with_test_data("return [((torch.full((2, 4), float('nan')),), None)]"), [],
                                          "on test batch 0 holds no finite value"),
    "test_data() items are not pairs": (with_test_data("return [(torch.randn(2, 4),)]"), [],
                                        "must yield (inputs, target) pairs"),
    "test_data() raises": (with_test_data("raise OSError('no data folder')"), [],
                           "test_data() raised OSError: no data folder"),
    "metric() returns a string": (metric("return 'good'"), [], "metric() returned str 'good'"),
    "metric() returns NaN": (metric("return float('nan')"), [], "metric() returned nan"),
    "metric() returns None": (metric("return None"), [], "metric() returned NoneType"),
    "metric() raises": (metric("return 1 / 0"), [], "metric() raised ZeroDivisionError"),
    "dropout left on": (forward("return nn.functional.dropout(self.lin(x), 0.5, training=True)"), [], DISAGREE),
    "randomness in forward": (forward("return self.lin(x) + torch.rand(2)"), [], DISAGREE),
    "state kept between calls": (forward("self.calls += 1\n        return self.lin(x) * self.calls",
                                         "        self.calls = 0\n"), [], DISAGREE),
    "weights on the meta device": (HEAD + "def build_model():\n    return nn.Linear(4, 2, device='meta')\n" + INPUTS,
                                   [], "on the `meta` device"),
    "traffic() raises": (LINEAR + "def traffic():\n    raise KeyError('prod.csv')\n", [], "traffic() raised KeyError"),
    "traffic() returns a string": (LINEAR + "def traffic():\n    return 'mostly small'\n", [],
                                   "row 0 is str; each row must be a mapping"),
    "import raises": ("raise ImportError('needs the foo package')\n" + LINEAR, [], "importing it raised ImportError"),
    "no example_inputs()": (HEAD + "def build_model():\n    return nn.Linear(4, 2)\n", [],
                            "defines no `example_inputs()`"),
    "build_model() returns None": (HEAD + "def build_model():\n    return None\n" + INPUTS, [],
                                   "build_model() returned NoneType"),
    "forward returns a string": (forward("return 'logits'"), [], "returned str with no tensor in it"),
    "example_inputs() returns a list of ints": (HEAD + "def build_model():\n    return nn.Linear(4, 2)\n"
                                                "def example_inputs(batch_size=1):\n    return [1, 2]\n", [],
                                                "must return a torch.Tensor"),
    # --max-memory far below the baseline's own need (a 16 MB activation): refused, naming the need
    "--max-memory 1KiB": (forward("return self.lin(x) + torch.ones(4_000_000).sum()"), ["--max-memory", "1KiB"],
                          "below what the baseline itself needs"),
    "--max-memory lots": (LINEAR, ["--max-memory", "lots"], "`--max-memory` got 'lots'"),
    "--level 7": (LINEAR, ["--level", "7"], "`--level` got 7"),
    "--tolerance -1": (LINEAR, ["--tolerance", "-1"], "`--tolerance` got -1"),
    "--batch-size 0": (LINEAR, ["--batch-size", "0"], "`--batch-size` got 0"),
    "--device tpu": (LINEAR, ["--device", "tpu"], "`--device` got 'tpu'"),
    "--budget 3s": (LINEAR, ["--budget", "3s"], "too small to measure even the baseline"),
    "--strategy missing": (LINEAR, ["--strategy", "no-such-preset"], "no-such-preset"),
    "--p99-ms without traffic": (LINEAR, ["--p99-ms", "20"], "`--p99-ms` needs a traffic mix"),
    "--traffic missing file": (LINEAR, ["--traffic", "nowhere.csv"], "nowhere.csv"),
    "--mode bogus": (LINEAR, ["--mode", "bogus"], "`--mode` got 'bogus'"),
}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(res, expected: str, code: int = 2) -> str:
    """Exit `code`, one line on stderr naming the cause, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.stderr[-2000:], res.exception)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("autotiacc: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def write(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(INFERENCE))
def test_inference_file_or_flag_is_refused_up_front(tmp_path, case):
    text, flags, expected = INFERENCE[case]
    out = tmp_path / "run"
    res = cli("tune", str(write(tmp_path / "m.py", text)), "--budget", "1m", "--out", str(out), "--quiet", *flags)
    one_line(res, expected)
    assert not out.exists()  # nothing written: the same --out works once the file is fixed


# -- saved models: messages that name the cause and the fix --------------------------------------------
def _saved(tmp_path, kind: str):
    model = nn_linear()
    path = tmp_path / {"ts": "m.ts", "state_dict": "m.pt", "pickled": "m.pt", "pt2": "m.pt2"}[kind]
    if kind == "ts":
        torch.jit.save(torch.jit.script(model), path)
    elif kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "pickled":
        torch.save(model, path)
    else:
        torch.export.save(torch.export.export(model, (torch.randn(1, 4),)), path)
    return path


def nn_linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()


SAVED = {
    "TorchScript given a wrong --input-shape": ("ts", ["--input-shape", "1x5"],
                                                "raised on inputs 1x5 float32 (from --input-shape, --input-dtype): "
                                                "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    "TorchScript given a wrong --input-dtype": ("ts", ["--input-shape", "1x4", "--input-dtype", "int64"],
                                                "raised on inputs 1x4 int64 (from --input-shape, --input-dtype): "
                                                "RuntimeError: mat1 and mat2 must have the same dtype"),
    "a state_dict .pt": ("state_dict", ["--input-shape", "1x4"], "a state_dict (2 tensors of weights), not a model"),
    "a pickled module .pt": ("pickled", ["--input-shape", "1x4"], "a pickled model (torch.save(model))"),
    ".pt2 exported at batch 1, given 3x4": ("pt2", ["--input-shape", "3x4"],
                                           "specialised to the input shapes it was exported with ([1, 4]) and got "
                                           "3x4 float32 (Guard failed: input.size()[0] == 1); re-export it with "
                                           "dynamic dims"),
}


@pytest.mark.parametrize("case", list(SAVED))
def test_saved_model_message_names_cause_and_fix(tmp_path, case):
    kind, flags, expected = SAVED[case]
    out = tmp_path / "run"
    line = one_line(cli("tune", str(_saved(tmp_path, kind)), "--budget", "1m", "--out", str(out), "--quiet", *flags),
                    expected)
    assert "Traceback of TorchScript" not in line and "~~~" not in line
    assert not out.exists()


def test_torchscript_shape_error_says_where_it_failed(tmp_path):
    line = one_line(cli("tune", str(_saved(tmp_path, "ts")), "--budget", "1m", "--quiet", "--input-shape", "1x5"),
                    "(at linear.py:")
    assert "give the shapes (--input-shape, --input-dtype) it takes" in line


# -- training files ---------------------------------------------------------------------------------------
TRAIN = """import torch
from torch import nn
batch_size = 8
class DS(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x, self.y = torch.randn(n, 4), torch.randn(n, 1)
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i]
def build_model():
    return nn.Linear(4, 1)
def train_dataset():
    return DS()
def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
"""


def train(old: str, new: str) -> str:
    assert old in TRAIN
    return TRAIN.replace(old, new)


LOSS = "    return nn.functional.mse_loss(model(x), y)"
TRAINING = {
    "empty dataset": (train("return DS()", "return DS(0)"), [], "train_dataset() is empty (len 0)"),
    "dataset smaller than a batch": (train("return DS()", "return DS(5)"), [], "5 samples, fewer than one batch (8)"),
    "NaN loss": (train(LOSS, LOSS + " * float('nan')"), [], "loss_fn(model, batch) returned nan on the first batch"),
    "non-scalar loss": (train(LOSS, "    return (model(x) - y).pow(2).squeeze(1)"), [],
                        "returned a tensor of shape [8]; it must return a scalar"),
    "loss as a Python float": (train(LOSS, LOSS + ".item()"), [], "returned float; it must return the loss"),
    "detached loss": (train(LOSS, LOSS + ".detach()"), [], "a loss with no gradient"),
    "no loss_fn()": (TRAIN[:TRAIN.index("def loss_fn")], [], "defines no `loss_fn()`"),
    "dataset is a generator": (train("return DS()", "return (i for i in range(3))"), [],
                               "must return a map-style torch Dataset"),
    "weights on the meta device": (train("return nn.Linear(4, 1)", "return nn.Linear(4, 1, device='meta')"), [],
                                   "on the `meta` device"),
    "build_model() raises": (train("return nn.Linear(4, 1)", "raise RuntimeError('no GPU')"), [],
                             "build_model() raised RuntimeError: no GPU"),
    "--nproc beyond the cores": (TRAIN, ["--nproc", "64"], "`--nproc` 64 is more than the"),
    "--max-memory below the baseline": (TRAIN, ["--max-memory", "1MiB"], "below what the baseline itself needs"),
    "--export in training": (TRAIN, ["--export"], "`--export` saves an inference artifact"),
}


@pytest.mark.parametrize("case", list(TRAINING))
def test_training_file_or_flag_is_refused_up_front(tmp_path, case):
    text, flags, expected = TRAINING[case]
    out = tmp_path / "run"
    res = cli("tune", str(write(tmp_path / "train.py", text)), "--mode", "train", "--budget", "1m", "--out", str(out),
              "--quiet", *flags)
    one_line(res, expected)
    assert not out.exists()  # no run.json, no study.db: the same --out works once the file is fixed


# -- plan files -------------------------------------------------------------------------------------------
def _training_plan(tmp_path):
    from autotiacc.training.plan import TrainingPlan

    path = tmp_path / "plan.json"
    TrainingPlan(batch_size=8).save(path)
    return path


def test_verify_of_a_training_plan_says_what_it_is(tmp_path):
    plan = _training_plan(tmp_path)
    before = plan.read_text()
    line = one_line(cli("verify", str(plan), str(write(tmp_path / "m.py", LINEAR))), "this is a training plan")
    assert "autotiacc.training.apply" in line
    assert plan.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.py", "plan.json"]


def test_training_plan_reader_names_an_inference_plan(tmp_path):
    from autotiacc.errors import PlanError
    from autotiacc.inference.plan import Plan
    from autotiacc.knobs import configs_from_params
    from autotiacc.training import load_training_plan

    Plan(knobs=configs_from_params({})).save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="this is an inference plan, not a training plan; load it with "):
        load_training_plan(tmp_path / "plan.json")


def test_verify_with_another_model_names_it(tmp_path):
    from autotiacc.inference.plan import Plan
    from autotiacc.knobs import configs_from_params

    Plan(knobs=configs_from_params({}), workload={"name": "other", "param_shapes_sha256": "0" * 16,
                                                  "batch_size": 1}).save(tmp_path / "plan.json")
    one_line(cli("verify", str(tmp_path / "plan.json"), str(write(tmp_path / "m.py", LINEAR))),
             "its model's parameter shapes differ from the model the plan was tuned for")


# -- the public API: errors at once, not after the budget -------------------------------------------------
@pytest.mark.timeout(300)  # a one-hour budget: only the up-front check can end this in time
def test_optimize_of_a_meta_model_fails_at_once():
    import autotiacc
    from autotiacc.errors import WorkloadError

    with torch.device("meta"):
        model = torch.nn.Linear(4, 2)
    with pytest.raises(WorkloadError, match="on the `meta` device"):
        autotiacc.optimize(model, (torch.randn(1, 4),), budget="1h", device="cpu")


@pytest.mark.timeout(300)
def test_optimize_with_empty_test_data_is_refused():
    import autotiacc
    from autotiacc.errors import WorkloadError

    with pytest.raises(WorkloadError, match="`test_data` gave no batch"):
        autotiacc.optimize(torch.nn.Linear(4, 2), (torch.randn(1, 4),), test_data=[], budget="1h", device="cpu")


# -- silent wrong results: masked outputs are guarded, end to end through a trial's evaluation ------------
MASKED = HEAD + """class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
    def forward(self, x):
        logits = self.lin(x)
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, ::3] = True
        return logits.masked_fill(mask, float('-inf')).log_softmax(-1)
def build_model():
    return M()
def example_inputs(batch_size=1):
    return (torch.randn(batch_size, 16),)
"""


def test_masked_log_probs_are_guarded_in_a_trial(tmp_path):
    """bf16 weights on masked log-probabilities: the old guard saw rel_l2 0.0 (NaN over the
    whole tensor); now the error of the finite positions is measured, and it is not zero."""
    from autotiacc.inference.evaluate import evaluate
    from autotiacc.inference.workload import load_workload

    workload = load_workload(write(tmp_path / "masked.py", MASKED), timeout=120)
    assert workload.facts.guard_data == "seeded example_inputs: 4 batches"
    res = evaluate(workload, {"bf16": {"precision": {"mode": "bf16_weights"}}}, tolerance=0.5, target_s=0.2,
                   warmup_s=0.1)["candidates"]["bf16"]
    assert res["status"] == "ok", res
    assert 1e-4 < res["accuracy"]["rel_l2"] < 0.5, res["accuracy"]


# -- needs a tune ---------------------------------------------------------------------------------------
THREAD_AT_IMPORT = """import os, threading, time, torch
with open(os.environ["AUTOTIACC_TEST_PIDS"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
threading.Thread(target=lambda: time.sleep(10**6)).start()  # not a daemon: it keeps its process alive
def build_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
def example_inputs(batch_size=1):
    return (torch.randn(batch_size, 8),)
def traffic():
    return [{"batch_size": 1, "weight": 0.7}, {"batch_size": 3, "weight": 0.3}]
"""


def _tune(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotiacc.cli", "tune", *args, "--quiet"], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.slow
def test_a_thread_started_at_import_does_not_keep_tune_alive(tmp_path):
    """The tuner imports nothing of the user's file: a non-daemon thread started at import lives
    in the check's child and the workers, which end; `tune` prints its result and exits."""
    pids = tmp_path / "pids"
    budget = 45  # set-up took 30 s with the machine loaded 5x over its cores
    t0 = time.monotonic()
    model = write(tmp_path / "m.py", THREAD_AT_IMPORT)
    proc = subprocess.Popen([sys.executable, "-m", "autotiacc.cli", "tune", str(model), "--budget", f"{budget}s",
                             "--out", str(tmp_path / "run"), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "AUTOTIACC_TEST_PIDS": str(pids)})
    try:
        out, err = proc.communicate(timeout=budget + 120)  # the old tuner never exited
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "plan:" in out and (tmp_path / "run" / "plan.json").is_file()
    assert time.monotonic() - t0 < budget + 120
    imported_in = {int(p) for p in pids.read_text().split()}
    assert imported_in and proc.pid not in imported_in  # imported by children only


@pytest.mark.slow
def test_resume_refuses_a_model_file_changed_since(tmp_path):
    """ReLU swapped for Tanh keeps every parameter shape: only the file's hash tells them apart."""
    model = write(tmp_path / "m.py", HEAD + "def build_model():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), "
                  "nn.Linear(8, 2))\n" + INPUTS)
    out = tmp_path / "run"
    first = _tune(str(model), "--budget", "45s", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {name: (out / name).read_bytes() for name in ("trials.csv", "plan.json")}
    trials = _trial_states(out)
    model.write_text(model.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    again = _tune(str(model), "--budget", "45s", "--out", str(out), "--resume")
    assert again.returncode == 2, again.stderr[-3000:]
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "the model file as it was then" in lines[0] and "has changed since" in lines[0], lines
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing lost
    assert _trial_states(out) == trials  # nothing added to the study


def _trial_states(run_dir) -> list[tuple[int, str]]:
    import optuna

    study = optuna.load_study(study_name="autotiacc", storage=f"sqlite:///{run_dir / 'study.db'}")
    return [(t.number, t.state.name) for t in study.trials]


# -- the user's code never runs in the tuner's process ------------------------------------------------
TRAFFIC_MODEL = """import os, torch
with open(os.environ["AUTOTIACC_TEST_PIDS"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
def build_model():
    return torch.nn.Linear(4, 2)
def example_inputs(batch_size=1, seq_len=8):
    return (torch.randn(batch_size, seq_len, 4),)
def traffic():
    return [{"batch_size": 1, "seq_len": 5, "weight": 0.6}, {"batch_size": 2, "seq_len": 12, "weight": 0.4}]
def pad_inputs(inputs, seq_len):
    return (torch.nn.functional.pad(inputs[0], (0, 0, 0, seq_len - inputs[0].shape[1])),)
"""


def test_setting_up_a_traffic_search_runs_no_user_code_here(tmp_path, monkeypatch):
    """traffic(), example_inputs at the traffic's sizes (where each dim lives) and pad_inputs:
    answered by children; this process (the tuner's) never imports the file."""
    from autotiacc.inference.shapes.shape_tuning import ShapeTuning, shape_tuning_for
    from autotiacc.inference.workload import load_workload

    pids = tmp_path / "pids"
    monkeypatch.setenv("AUTOTIACC_TEST_PIDS", str(pids))
    workload = load_workload(write(tmp_path / "m.py", TRAFFIC_MODEL), timeout=120)
    tuning = shape_tuning_for(workload)
    assert isinstance(tuning, ShapeTuning) and tuning.can_pad
    assert tuning.axes == {"batch_size": [(0, 0)], "seq_len": [(0, 1)]}
    imported_in = {int(p) for p in pids.read_text().split()}
    assert len(imported_in) == 2 and os.getpid() not in imported_in  # the check's child, then the axes' child
