"""Every bad input gets one clear line on stderr, exit code 2, no traceback, no plan written."""
import pytest

from .conftest import run_cli

GOOD = "import torch\ndef build_model():\n    return torch.nn.Linear(4, 2)\ndef example_inputs(batch_size=1):\n    return (torch.randn(batch_size, 4),)\n"
CASES = {
    "missing file": (None, [], "no such file"),
    "syntax error": ("def build_model(:\n", [], "syntax error"),
    "no build_model": ("import torch\ndef example_inputs(batch_size=1):\n    return torch.randn(1)\n", [], "defines no `build_model()`"),
    "no example_inputs": ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n", [], "defines no `example_inputs()`"),
    "inputs not tensors": ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\ndef example_inputs(batch_size=1):\n    return {'x': 1}\n",
                           [], "must return a torch.Tensor"),
    "model raises": ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\ndef example_inputs(batch_size=1):\n    return torch.randn(batch_size, 5)\n",
                     [], "raised on its own example inputs"),
    "bad budget": (GOOD, ["--budget", "fast"], "`--budget` got 'fast'"),
    "tiny budget": (GOOD, ["--budget", "3s"], "too small to measure even the baseline"),
    "unknown strategy": (GOOD, ["--strategy", "warp"], "`--strategy` got 'warp'"),
    "unknown level": (GOOD, ["--level", "7"], "`--level` got 7"),
    "garbage torchscript": ("\x00\x01garbage", ["--input-shape", "1x4"], "not a readable TorchScript"),
    "bad input shape": ("\x00", ["--input-shape", "1xfoo"], "`--input-shape` got '1xfoo'"),
    # flags of the other mode are refused, not dropped (issue 20: --mode train ignored --level, --traffic...)
    "train with --level": (GOOD, ["--mode", "train", "--level", "0"], "`--level` only applies to --mode infer"),
    "train with shape flags": (GOOD, ["--mode", "train", "--input-shape", "1x4", "--traffic", "t.csv", "--p99-ms",
                                      "5"], "`--input-shape`, `--traffic`, `--p99-ms` only apply to --mode infer"),
    "train with --export": (GOOD, ["--mode", "train", "--export"], "autotiacc.training.apply"),
    "infer with --nproc": (GOOD, ["--nproc", "2"], "`--nproc` only applies to --mode train; drop it with --mode infer"),
    "unknown mode": (GOOD, ["--mode", "serve"], "`--mode` got 'serve'"),
    "train with --nproc 0": (GOOD, ["--mode", "train", "--nproc", "0"], "`--nproc` got 0: use 1 or more processes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    content, extra, expected = CASES[case]
    suffix = ".pt" if case in ("garbage torchscript", "bad input shape") else ".py"
    model = tmp_path / f"model{suffix}"
    if content is not None:
        model.write_text(content)
    out = tmp_path / "run"
    res = run_cli("tune", str(model), "--budget", "1m", "--out", str(out), "--quiet", *extra, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("autotiacc: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not (out / "plan.json").exists() and not (out / "run.json").exists()


def test_unwritable_output_dir(tmp_path):
    (tmp_path / "model.py").write_text(GOOD)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    res = run_cli("tune", str(tmp_path / "model.py"), "--budget", "1m", "--out", str(blocker / "run"), "--quiet")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "`--out`" in res.stderr
    assert f"{blocker} is a file, not a folder" in res.stderr and not blocker.is_dir()
    assert "Traceback" not in res.stderr


def test_debug_shows_the_traceback(tmp_path):
    res = run_cli("--debug", "tune", str(tmp_path / "none.py"), "--budget", "1m")
    assert res.returncode == 2 and "Traceback" in res.stderr


def test_report_on_a_non_run_dir(tmp_path):
    res = run_cli("report", str(tmp_path))
    assert res.returncode == 2 and "not a run directory" in res.stderr


def test_resume_without_a_run(tmp_path):
    (tmp_path / "model.py").write_text(GOOD)
    res = run_cli("tune", str(tmp_path / "model.py"), "--budget", "1m", "--out", str(tmp_path / "r"), "--resume")
    assert res.returncode == 2 and "holds no tune to continue" in res.stderr
