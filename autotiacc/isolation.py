"""Run one function in a fresh, spawned process with a timeout: the trial sandbox.

A candidate can raise, segfault, hang or exhaust memory; none of that may take the tuner
down (Optuna has no per-trial timeout, and one hung experiment stalled DeepSpeed's
autotuner). Processes are *spawned*, never forked: a child forked after the parent ran an
OpenMP-parallel op hangs in its first parallel region (measured here with a conv2d).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

# Environment for trial processes: one inductor compile thread (no pool to orphan on kill);
# passive OpenMP waits so timing interleaved candidates does not fight spinning threads.
# Inductor's on-disk FX graph cache is shared by all trials and runs: a candidate compiled once
# (in a trial) rebuilds from cache in the final re-measurement and in production.
CHILD_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}


def measured_env() -> dict[str, str]:
    """The thread settings trials are measured under; a plan records them (they change speed)."""
    return {"OMP_WAIT_POLICY": CHILD_ENV["OMP_WAIT_POLICY"]}


@dataclass
class Outcome:
    """What came back from an isolated call."""

    status: str  # ok | exception | timeout | crash | oom
    value: Any = None
    error: str = ""
    traceback: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reason(self) -> str:
        return f"{self.status}: {self.error}" if not self.ok else ""


def _die_with_parent() -> None:
    """Linux: have the kernel kill this trial if the tuner dies (kill -9 leaves no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _child(conn, fn: Callable[..., Any], args: tuple, kwargs: dict, log_path: str | None) -> None:
    _die_with_parent()
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        value = fn(*args, **kwargs)
        conn.send(("ok", value, "", ""))
    except MemoryError as exc:
        conn.send(("oom", None, f"MemoryError: {exc}", traceback.format_exc()))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        msg = f"{type(exc).__name__}: {exc}"
        kind = "oom" if "out of memory" in str(exc).lower() else "exception"
        conn.send((kind, None, msg[:2000], traceback.format_exc()))
    finally:
        conn.close()


def start_child(fn: Callable[..., Any], args: tuple, kwargs: dict, *, log_path: str | None = None,
                env: dict[str, str] | None = None, daemon: bool = True):
    """Spawn `_child` running `fn` with CHILD_ENV (+ `env`); returns (process, receiving pipe end)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    merged = {**CHILD_ENV, **(env or {})}
    saved = {k: os.environ.get(k) for k in merged}
    os.environ.update(merged)  # a spawned child copies the parent's environment at start
    try:
        proc = ctx.Process(target=_child, args=(send, fn, args, kwargs, log_path), daemon=daemon)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    return proc, recv


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float, log_path: str | None = None,
                 env: dict[str, str] | None = None, **kwargs: Any) -> Outcome:
    """Call `fn(*args, **kwargs)` in a spawned process; never raises for the child's failures.

    `fn` must be importable by name (module-level) and its arguments picklable. The child's
    stdout/stderr go to `log_path` when given. On timeout the child is killed.
    """
    t0 = time.perf_counter()
    proc, recv = start_child(fn, args, kwargs, log_path=log_path, env=env)
    try:
        result = None
        deadline = t0 + max(timeout, 0.1)
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            if recv.poll(min(left, 0.5)):
                try:
                    result = recv.recv()
                except EOFError:  # child died without sending; let it be reaped
                    result = None
                    proc.join(timeout=5)
                break
            if not proc.is_alive() and not recv.poll(0):
                break
        if result is not None:
            proc.join(timeout=10)
            status, value, err, tb = result
            return Outcome(status, value, err, tb, time.perf_counter() - t0)
        if proc.is_alive():
            _kill(proc)
            return Outcome("timeout", error=f"no result within {timeout:.0f} s; the trial was killed",
                           seconds=time.perf_counter() - t0)
        proc.join(timeout=5)
        code = proc.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            kind = "oom" if -code == signal.SIGKILL else "crash"
            hint = " (killed: likely out of memory)" if kind == "oom" else ""
            return Outcome(kind, error=f"process died with {sig}{hint}", seconds=time.perf_counter() - t0)
        return Outcome("crash", error=f"process exited with code {code} before reporting",
                       seconds=time.perf_counter() - t0)
    finally:
        recv.close()
        if proc.is_alive():
            _kill(proc)


def _kill(proc) -> None:
    proc.kill()
    proc.join(timeout=10)
