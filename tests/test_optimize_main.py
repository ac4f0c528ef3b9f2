"""`autotiacc.optimize` where users call it: a script without a `__main__` guard, `python -` with
the model class defined in `__main__` (as in a notebook), and a model from an imported module.
Workers never re-import the caller's `__main__`; the model travels by value (cloudpickle).
Each case is a real subprocess; it also checks that the result is a drop-in (same values and
dtype, with its plan), that optimize() leaves the caller's matplotlib backend and warning
filters as they were, and that no semaphore is reported leaked."""
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import MODELS, ROOT

# The baseline and one candidate (patience ends the tune): these tests prove where optimize() can
# be called from, which one measured trial in a worker shows as well as a whole search.
STRATEGY_LINE = f"STRATEGY = {str(MODELS / 'short_strategy.yaml')!r}\n"

MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
'''

CALL = '''
import warnings
from pathlib import Path
import matplotlib
import torch
import autotiacc

backend, filters = matplotlib.get_backend(), list(warnings.filters)
torch.manual_seed(0)
model = Tiny().eval()
x = torch.randn(4, 16)
fast = autotiacc.optimize(model, (x,), budget="3m", strategy=STRATEGY, out_dir=OUT)  # the strategy's patience ends it
y = fast(x)
same = torch.allclose(y, model(x), atol=1e-2) and y.dtype == torch.float32  # a drop-in: same values and dtype
planned = (Path(OUT) / "plan.json").exists() and fast.plan.fingerprint["cpu_count"] >= 1
print("RESULT", same, planned, matplotlib.get_backend() == backend, list(warnings.filters) == filters)
'''


def _check(res: subprocess.CompletedProcess, out) -> None:
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "RESULT True True True True" in res.stdout, text[-3000:]
    for bad in ("Traceback", "bootstrapping", "leaked semaphore", "FileNotFoundError"):
        assert bad not in text, text[-3000:]
    trials = (out / "trials.csv").read_text()
    assert ",ok," in trials  # at least the baseline was measured in a worker that unpickled Tiny


def _run(args, tmp_path, **kw) -> subprocess.CompletedProcess:
    # a user's bare environment, but the profile cache of this test session (not ~/.cache)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "AUTOTIACC_CACHE_DIR": os.environ["AUTOTIACC_CACHE_DIR"]}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=env, **kw)


@pytest.mark.slow
def test_optimize_from_a_script_without_main_guard(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "plain.py"
    script.write_text(MODEL + f"OUT = {str(out)!r}\n" + STRATEGY_LINE + CALL)  # no `if __name__ == "__main__":`
    _check(_run([str(script)], tmp_path), out)


@pytest.mark.slow
def test_optimize_from_stdin_with_the_class_in_main(tmp_path):
    out = tmp_path / "run"
    _check(_run(["-"], tmp_path, input=MODEL + f"OUT = {str(out)!r}\n" + STRATEGY_LINE + CALL), out)


@pytest.mark.slow
def test_optimize_a_model_from_an_imported_module(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "usermodels.py").write_text(MODEL)
    script = tmp_path / "use.py"
    script.write_text(textwrap.dedent("from usermodels import Tiny\n") + f"OUT = {str(out)!r}\n" + STRATEGY_LINE + CALL)
    _check(_run([str(script)], tmp_path), out)


@pytest.mark.slow
def test_building_a_compiled_plan_keeps_the_callers_warning_filters(tmp_path):
    """Inductor imports sympy, which installs a warning filter at import: the build restores them."""
    code = (MODEL + "import warnings\nfrom autotiacc.inference.candidate import OptimizedModel\n"
            "from autotiacc.knobs import configs_from_params\nbefore = list(warnings.filters)\n"
            "m = Tiny().eval()\nx = torch.randn(2, 16)\n"
            "f = OptimizedModel(m, configs_from_params({'execution': {'backend': 'compile'}}), example_inputs=(x,))\n"
            "f(x)\nprint('SAME', list(warnings.filters) == before)\n")
    res = _run(["-"], tmp_path, input=code)
    assert "SAME True" in res.stdout, res.stdout + res.stderr[-2000:]
