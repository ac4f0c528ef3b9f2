"""Trials that raise, hang, crash or run out of memory become failed outcomes, never a dead tuner;
a warm worker keeps its state between calls and is replaced after it dies."""
import os
import re
from pathlib import Path

import pytest

from autotiacc.engine.workers import WorkerPool, run_isolated, worker_env

from . import _isolation_targets as t
from .conftest import wait_until


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
    out = run_isolated(t.hangs, timeout=3)  # (a call that returned would say "ok" after its 600 s)
    assert out.status == "timeout" and "no result within 3 s; the worker was killed" in out.error


def test_a_timeout_says_where_the_call_was_stuck(tmp_path):
    """The timeout takes the call's Python stack before the kill. The call says when it is inside
    (a file) and only then is its time up, so the stack is never taken while the worker starts."""
    entered = tmp_path / "entered"
    with WorkerPool() as pool:
        pending = pool.submit(t.hangs_after_saying, str(entered))
        wait_until("the call inside hangs_after_saying", entered.exists)
        out = pool.collect(pending, timeout=0)  # its time is up now
    assert out.status == "timeout"
    assert re.search(r'_isolation_targets.py", line \d+ in hangs_after_saying', out.traceback), out.traceback


@pytest.mark.parametrize("fn,status,text", [(t.segfaults, "crash", "SIGSEGV"), (t.killed, "oom", "SIGKILL"),
                                            (t.memory_error, "oom", "MemoryError")])
def test_crashes_and_oom(fn, status, text):
    out = run_isolated(fn, timeout=60)
    assert out.status == status
    assert text in out.error


def test_warm_worker_keeps_state_and_a_raise_keeps_it(tmp_path):
    with WorkerPool(log_dir=tmp_path) as pool:
        a = pool.call(t.counter, timeout=60)
        b = pool.call(t.counter, timeout=60)
        assert a.ok and b.ok and a.value[0] == b.value[0] != os.getpid()
        assert b.value[1] == a.value[1] + 1  # the module-level counter survived between calls
        bad = pool.call(t.raises, timeout=60)
        assert bad.status == "exception" and "candidate exploded" in bad.error
        c = pool.call(t.counter, timeout=60)
        assert c.value == (a.value[0], a.value[1] + 2) and pool.started == 1
        log = tmp_path / "call.log"
        assert pool.call(t.prints_then_returns, 5, timeout=60, log_path=str(log)).value == 5
        assert log.read_text() == "hello from the trial\n"  # per-call output, and only that call's


@pytest.mark.parametrize("fn,args,status,text", [
    (t.hangs, (), "timeout", "no result within 3 s"),
    (t.exits, (3,), "crash", "exited with code 3"),
    (t.sys_exits, (0,), "crash", "sys.exit(0)"),
    (t.killed, (), "oom", "SIGKILL: killed (likely out of memory)"),
    (t.segfaults, (), "crash", "SIGSEGV"),
])
def test_a_dying_worker_is_recorded_and_replaced(fn, args, status, text):
    with WorkerPool() as pool:
        first = pool.call(t.counter, timeout=60)
        pid = pool.pid
        # a short timeout for the hang only: a loaded machine may take seconds to run the others
        out = pool.call(fn, *args, timeout=3 if fn is t.hangs else 120)
        assert out.status == status and text in out.error, out
        assert pool.pid is None  # the dead or hung worker is gone
        try:
            os.kill(pid, 0)
            alive = Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive
        again = pool.call(t.counter, timeout=60)
        assert again.ok and again.value[0] != first.value[0] and again.value[1] == 1  # a fresh worker
        assert pool.started == 2


def test_close_ends_the_worker():
    pool = WorkerPool()
    assert pool.call(t.add, 1, 2, timeout=60).value == 3
    pid = pool.worker.pid
    pool.close()
    assert t.process_gone(pid)


def test_worker_env_keeps_inductor_caches_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTIACC_CACHE_DIR", str(tmp_path / "usercache"))
    env = worker_env(tmp_path / "run")
    with WorkerPool(env=env) as pool:
        out = pool.call(t.inductor_cache_dir, timeout=60)
    assert out.ok, out.error
    assert out.value == str(tmp_path / "usercache" / "inductor")
    assert (tmp_path / "usercache" / "inductor").is_dir()


def test_worker_env_falls_back_to_the_run_dir_when_the_user_cache_is_not_writable(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")  # mkdir under it fails, as read-only would
    monkeypatch.setenv("AUTOTIACC_CACHE_DIR", str(blocked))
    env = worker_env(tmp_path / "run")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "run" / "cache" / "inductor").resolve())
    assert (tmp_path / "run" / "cache" / "inductor").is_dir()


def test_unpicklable_call_is_an_exception_outcome():
    import threading

    with WorkerPool() as pool:
        out = pool.call(t.add, threading.Lock(), 1, timeout=60)
        assert out.status == "exception" and "could not be sent" in out.error
        assert pool.call(t.add, 1, 1, timeout=60).value == 2


def test_submitted_calls_run_side_by_side_and_a_crash_costs_only_its_own_pool(tmp_path):
    pools = [WorkerPool() for _ in range(3)]
    try:
        for p in pools:
            assert p.call(t.add, 0, 0, timeout=60).ok
        # each of the first two returns only once the other has started: they ran side by side
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        pending = [pools[0].submit(t.meets, a, b, "a"), pools[1].submit(t.meets, b, a, "b"), pools[2].submit(t.segfaults)]
        outs = [p.collect(x, timeout=600) for p, x in zip(pools, pending)]
        assert [o.value for o in outs[:2]] == ["a", "b"] and outs[2].status == "crash", outs
        assert pools[2].worker is None and pools[2].call(t.add, 1, 1, timeout=60).value == 2  # replaced
        assert pools[0].pid is not None  # the others kept their workers
        unpicklable = pools[0].submit(t.add, __import__("threading").Lock(), 1)
        assert pools[0].collect(unpicklable, timeout=60).status == "exception"
    finally:
        for p in pools:
            p.close()
