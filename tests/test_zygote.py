"""The fork server (engine/zygote.py): workers forked from one process that imported torch,
with the environment they ask for, their deaths reported, and nothing left behind."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autotiacc.engine import zygote
from autotiacc.engine.workers import TOOL_ENV, WorkerPool, run_isolated

from . import _isolation_targets as t
from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**TOOL_ENV, **os.environ, **extra}


_gone = t.process_gone


def test_workers_are_forked_from_one_zygote_that_never_runs_an_op():
    a = run_isolated(t.process_facts, 64, timeout=60)
    b = run_isolated(t.process_facts, 64, timeout=60)
    z = zygote.zygote_for(_env())
    assert a.ok and b.ok
    assert a.value["ppid"] == b.value["ppid"] == z.proc.pid  # both forked by the same zygote
    assert a.value["pid"] != b.value["pid"]
    # each child runs OpenMP-parallel ops with every thread; the zygote ran none, so forking stays safe
    assert a.value["threads"] == b.value["threads"] >= 1 and a.value["matmul"] == 64.0 ** 3
    # on a CPU-only machine the zygote imports the compile stack once it has served what was asked
    if zygote._gpu_present():  # never: importing it may probe the driver
        assert not run_isolated(t.process_facts, timeout=60).value["inductor_loaded"]
    else:
        wait_until("a worker forked with inductor loaded",
                   lambda: run_isolated(t.process_facts, timeout=60).value["inductor_loaded"])


def test_lazy_variables_are_set_after_the_fork_and_load_time_ones_get_their_own_zygote(monkeypatch):
    monkeypatch.delenv("ZYGOTE_TEST_MARK", raising=False)
    base = run_isolated(t.process_facts, timeout=60)
    lazy = run_isolated(t.process_facts, timeout=60, env={"TORCHINDUCTOR_CACHE_DIR": "/tmp/autotiacc-zygote-test"})
    other = run_isolated(t.process_facts, timeout=60, env={"ZYGOTE_TEST_MARK": "1"})
    rank = run_isolated(t.process_facts, timeout=60, env={"RANK": "1", "MASTER_PORT": "29512"})
    assert lazy.value["ppid"] == base.value["ppid"] == rank.value["ppid"]  # inductor's, DDP's: the same zygote
    assert lazy.value["env"]["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/autotiacc-zygote-test"
    assert base.value["env"]["TORCHINDUCTOR_CACHE_DIR"] == os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    assert other.value["ppid"] != base.value["ppid"]  # any other variable may be read at load time
    assert other.value["env"]["ZYGOTE_TEST_MARK"] == "1" and base.value["env"]["ZYGOTE_TEST_MARK"] is None


def test_idle_zygotes_of_other_environments_are_ended():
    zs = [zygote.zygote_for(_env(ZYGOTE_TEST_MARK=str(i))) for i in range(zygote.MAX_IDLE_ZYGOTES + 2)]
    try:
        ended = [z for z in zs if z.dead()]
        assert len(ended) >= 1 and zs[-1] not in ended  # the oldest idle ones go, the one in use stays
        assert sum(not z.dead() for z in zs) <= zygote.MAX_IDLE_ZYGOTES + 1
    finally:
        for z in zs:
            if not z.dead():
                z.close()


def test_a_zygote_that_dies_takes_its_workers_and_the_next_call_gets_a_new_one():
    pool = WorkerPool()
    try:
        first = pool.call(t.process_facts, timeout=60).value
        old = zygote.zygote_for(_env())
        pending = pool.submit(t.hangs)
        os.kill(old.proc.pid, signal.SIGKILL)
        out = pool.collect(pending, timeout=30)
        assert out.status in ("crash", "oom") and pool.worker is None
        again = pool.call(t.process_facts, timeout=60).value
        assert again["ppid"] != first["ppid"] == old.proc.pid
        wait_until("the first worker's end", lambda: _gone(first["pid"]), limit_s=60)
    finally:
        pool.close()


def test_kill_9_of_the_caller_leaves_neither_the_zygote_nor_its_workers(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from autotiacc.engine import zygote
        from autotiacc.engine.workers import WorkerPool
        from tests import _isolation_targets as t
        pool = WorkerPool()
        facts = pool.call(t.process_facts, timeout=60).value
        pool.submit(t.hangs)
        print(facts["ppid"], facts["pid"], flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        zygote_pid, worker_pid = (int(x) for x in proc.stdout.readline().split())
        assert not _gone(zygote_pid) and not _gone(worker_pid)
    finally:
        proc.kill()
        proc.wait()
    wait_until("the zygote's and its worker's end", lambda: _gone(zygote_pid) and _gone(worker_pid), limit_s=60)


def test_without_the_fork_server_workers_are_spawned(monkeypatch):
    monkeypatch.setenv("AUTOTIACC_FORKSERVER", "0")
    out = run_isolated(t.process_facts, 16, timeout=60)
    assert out.ok and out.value["ppid"] == os.getpid() and out.value["matmul"] == 16.0 ** 3
    assert run_isolated(t.killed, timeout=60).status == "oom"


@pytest.fixture(autouse=True)
def _no_stray_test_zygotes():
    yield
    for key in list(zygote._ZYGOTES):  # the ZYGOTE_TEST_MARK ones serve no other test
        if any(k == "ZYGOTE_TEST_MARK" for k, _ in key):
            zygote._ZYGOTES.pop(key).close()
