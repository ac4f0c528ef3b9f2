"""Trials that raise, hang, crash or run out of memory become failed outcomes, never a dead tuner."""
import time

import pytest

from autotiacc.isolation import run_isolated

from . import _isolation_targets as t


def test_ok_and_log(tmp_path):
    log = tmp_path / "trial.log"
    out = run_isolated(t.prints_then_returns, {"a": 1}, timeout=60, log_path=str(log))
    assert out.ok and out.value == {"a": 1}
    assert "hello from the trial" in log.read_text()


def test_exception_is_reported_with_traceback():
    out = run_isolated(t.raises, timeout=60)
    assert out.status == "exception"
    assert "ValueError: candidate exploded" in out.error
    assert "raises" in out.traceback


def test_hang_is_killed_at_timeout():
    t0 = time.monotonic()
    out = run_isolated(t.hangs, timeout=3)
    assert out.status == "timeout"
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("fn,status,text", [(t.segfaults, "crash", "SIGSEGV"), (t.killed, "oom", "SIGKILL"),
                                            (t.memory_error, "oom", "MemoryError")])
def test_crashes_and_oom(fn, status, text):
    out = run_isolated(fn, timeout=60)
    assert out.status == status
    assert text in out.error
