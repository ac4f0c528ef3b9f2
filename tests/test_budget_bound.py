"""The budget is a bound (issue 18 item 4): a tune's wall time, measured from outside (the CLI
subprocess, its start and the report included), stays within budget + max(5 %, 10 s), for tunes
of several sizes, resumed, and training. The final and the profile take what is left and are
cut rather than overrun; the output prints the wall time against the budget."""
from __future__ import annotations

import time

import pytest

from . import _training_targets as targets
from .conftest import MODELS, run_cli

pytestmark = pytest.mark.slow


# the one-line errors of a budget too short to measure even the baseline on this machine now
NO_BASELINE = ("too small to measure the baseline", "ended before the baseline could be measured",
               "the baseline training trial did not finish")


def slack_s(budget_s: float) -> float:
    return max(0.05 * budget_s, 10.0)


def _tune(*args: str, budget_s: float) -> tuple[float, str]:
    """Run a tune; assert it ended within its bound. A machine so loaded that the budget cannot
    even measure the baseline (eager convnet ran 750 ms a call here at load 7, 25 ms quiet) must
    still end within it, with that one-line error."""
    t0 = time.monotonic()
    res = run_cli("tune", *args, "--budget", f"{budget_s:.0f}s", "--quiet", timeout=budget_s * 3 + 120)
    wall = time.monotonic() - t0
    assert wall <= budget_s + slack_s(budget_s), f"budget {budget_s:.0f}s, took {wall:.0f}s\n{res.stdout}{res.stderr}"
    if res.returncode == 2 and any(why in res.stderr for why in NO_BASELINE):
        return wall, res.stdout
    assert res.returncode == 0, res.stderr
    assert "wall time:" in res.stdout and f"of a {budget_s:.0f}s budget" in res.stdout
    return wall, res.stdout


def test_a_tune_of_a_model_with_a_slow_forward_ends_within_its_budget(tmp_path, monkeypatch):
    """A 0.3 s forward: each final process builds and warms it up for seconds, its windows take
    seconds. The default strategy keeps asking trials until the budget ends them, so the search
    must keep what the final needs (before, a 60 s budget ran 90 s here: the final overran)."""
    monkeypatch.setenv("AUTOTIACC_TEST_SLEEP_S", "0.3")  # the tune's processes inherit it
    _tune(str(MODELS / "sleepy.py"), "--out", str(tmp_path / "run"), budget_s=90)


def test_a_resumed_tune_ends_within_its_budget(tmp_path):
    out = str(tmp_path / "run")
    _tune(str(MODELS / "tiny_mlp.py"), "--out", out, budget_s=30)
    _, stdout = _tune(str(MODELS / "tiny_mlp.py"), "--out", out, "--resume", budget_s=30)
    assert "trials measured:" in stdout


def test_a_training_tune_ends_within_its_budget(tmp_path):
    train = tmp_path / "train.py"
    train.write_text(targets.TINY_TRAIN)
    _tune(str(train), "--mode", "train", "--out", str(tmp_path / "run"), budget_s=45)
