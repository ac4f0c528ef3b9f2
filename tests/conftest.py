import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Profiles cached by tunes (engine.profile_cache) go to a folder of this test session, not the
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
