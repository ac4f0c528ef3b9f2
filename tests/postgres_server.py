"""A PostgreSQL server for tests: AUTOTIACC_TEST_PG_URL (set by .ci/run), else one started here
with .ci/postgres.sh (a private cluster on a free loopback port), else the test is skipped
unless AUTOTIACC_REQUIRE_PG=1, where the absence is a failure."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "postgres.sh"


def start_or_find_postgres():
    """Yields a postgresql:// URL; stops the server afterwards if it started one."""
    url = os.environ.get("AUTOTIACC_TEST_PG_URL")
    if url:
        yield url
        return
    workdir = tempfile.mkdtemp(prefix="autotiacc-pg-")
    proc = subprocess.run(["bash", str(SCRIPT), "start", workdir], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not proc.stdout.strip():
        msg = f"no PostgreSQL server: set AUTOTIACC_TEST_PG_URL or install postgresql ({proc.stderr[-500:]})"
        if os.environ.get("AUTOTIACC_REQUIRE_PG") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", workdir], capture_output=True, timeout=60)
