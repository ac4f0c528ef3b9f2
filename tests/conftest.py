import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Profiles cached by tunes (profiling.cache) go to a folder of this test session, not the
# user's ~/.cache: each session profiles afresh, tunes within it reuse.
os.environ.setdefault("AUTOTIACC_CACHE_DIR", tempfile.mkdtemp(prefix="autotiacc-test-cache-"))
MODELS = Path(__file__).resolve().parent / "models"


@pytest.fixture
def models_dir() -> Path:
    return MODELS


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `autotiacc` command in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "autotiacc.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)


def wait_until(what: str, condition: Callable[[], object], *, proc: subprocess.Popen | None = None,
               limit_s: float = 600) -> None:
    """Wait for an event (a file, a process's end, the study's state), polling; `limit_s` only
    guards against one that never comes (a bug), it never paces a test. With `proc`: fail at
    once when that process exits first."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc is None or proc.poll() is None, f"the process exited (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s:.0f} s"
        time.sleep(0.05)
