"""Isolated workers: run a function in another process with a timeout, and never go down with it.

A candidate can raise, segfault, hang or exhaust memory; none of that may take the tuner
down (Optuna has no per-trial timeout, and one hung experiment stalled DeepSpeed's
autotuner). `WorkerPool` keeps one warm worker for candidate after candidate (torch imported
once, models, baselines and a CUDA context kept); `run_isolated` is the one-shot form.

Workers are forked by a zygote (`zygote.py`: a `python -c` process that has imported torch
and never runs an op), or with `AUTOTIACC_FORKSERVER=0` started as `python -c
"...autotiacc.engine.worker_child..."` themselves; never forked from the caller (a child forked after
the parent ran an OpenMP-parallel op hangs in its first parallel region) nor by
multiprocessing's spawn (which re-imports the caller's `__main__`: a script without a
`__main__` guard would recurse, and `python -` or a notebook has no file to import).
Calls and results travel with cloudpickle, so a model class defined in `__main__` is sent by
value. Workers inherit the caller's environment: the tuner imposes nothing that changes speed.

One place classifies how a call ended (`classify_exit`): the statuses are
ok | exception | timeout | crash | oom. A SIGKILL we did not send is "oom", reported as
"killed (likely out of memory)": the kernel's OOM killer is the usual sender.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from . import worker_child as worker_side
from . import zygote
from ..profiling.cache import cache_root
from .status import WORKER_LOST, CallStatus

# Tool settings every worker gets unless the caller's environment sets them: one inductor
# compile thread (no compile pool to orphan when a worker is killed) and inductor's FX-graph
# cache on (compiled graphs rebuilt from disk). They change how long a compile takes, never how
# fast the compiled model runs, so the baseline is still measured in the environment of the
# `tune` command.
TOOL_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding `autotiacc/`
# The worker's entry point; `sys.path` is the caller's (sent with the first message), so
# functions and classes that cloudpickle sends by reference import as they do in the caller.
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from autotiacc.engine.worker_child import main; main(sys.argv[2:])")


@dataclass
class Outcome:
    """What came back from an isolated call."""

    status: CallStatus
    value: Any = None
    error: str = ""
    traceback: str = ""
    seconds: float = 0.0  # from the call's submission: a new worker's start included
    call_s: float = 0.0  # the call's own time in the worker

    @property
    def ok(self) -> bool:
        return self.status == CallStatus.OK

    def reason(self) -> str:
        return f"{self.status}: {self.error}" if not self.ok else ""


def classify_exit(code: int | None) -> tuple[CallStatus, str]:
    """(status, reason) for a process that ended without reporting, from its exit code."""
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            return CallStatus.OOM, f"died with {sig}: killed (likely out of memory)"
        return CallStatus.CRASH, f"died with {sig}"
    return CallStatus.CRASH, f"exited with code {code} before reporting"


def worker_env(run_dir: str | Path) -> dict[str, str]:
    """Environment for a tune's workers: inductor's caches (FX graphs included) in the user
    cache folder, kept across runs, so `--resume`, the final re-measurement and the next tune
    on this machine rebuild compiled graphs from disk. A process's first compile with a cold
    cache costs ~15 s more on a 2-core CPU (inductor builds its C++ prefix and probes the
    compiler); per-run caches paid that in every tune. Falls back to `<run_dir>/cache/inductor`
    where the user cache cannot be written."""
    for cache in (cache_root() / "inductor", Path(run_dir).resolve() / "cache" / "inductor"):
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cache, os.W_OK):
            break
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache)}


class Worker:
    """One worker process and its two pipes. Not thread-safe; one call at a time.

    The worker asks the kernel to kill it when the thread that started it dies
    (PR_SET_PDEATHSIG), so `kill -9` of the tuner leaves no orphan: start workers from a
    thread that lives as long as they should (the main thread).
    """

    def __init__(self, *, env: dict[str, str] | None = None, log_path: str | Path | None = None) -> None:
        import cloudpickle  # noqa: F401 - fail here, clearly, if the dependency is missing

        call_r, call_w = os.pipe()
        res_r, res_w = os.pipe()
        # where the worker writes its threads' stacks when asked (`stack`): a file unlinked at once,
        # shared by descriptor, so nothing is left behind however either side ends
        self._stack_fd, path = tempfile.mkstemp(prefix="autotiacc-stack-")
        os.unlink(path)
        full_env = {**TOOL_ENV, **os.environ, **(env or {}), worker_side.STACK_FD_ENV: str(self._stack_fd)}
        out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child
        try:
            if zygote.enabled():  # forked from a process that has imported torch already
                fds = [call_r, res_w, self._stack_fd] + ([out.fileno()] if out else [])
                self.proc: subprocess.Popen | zygote.ForkedProcess = zygote.fork_worker(full_env, fds)
            else:  # the descriptors keep their numbers in the child
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _ENTRY, _PACKAGE_PARENT, str(call_r), str(res_w), str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                    env=full_env, pass_fds=(call_r, res_w, self._stack_fd), close_fds=True)
        except BaseException:
            os.close(self._stack_fd)
            raise
        finally:
            os.close(call_r)
            os.close(res_w)
            if out:
                out.close()
        self._send = Connection(call_w, readable=False)
        self._recv = Connection(res_r, writable=False)
        self._path_sent = False
        self.calls = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, fn: Callable[..., Any], args: tuple, kwargs: dict, log_path: str | None) -> None:
        """Send one call; raises `pickle.PicklingError`/`TypeError` if it cannot be sent."""
        import cloudpickle

        payload = cloudpickle.dumps((None if self._path_sent else list(sys.path), fn, args, kwargs,
                                     str(log_path) if log_path else None))
        self._send.send_bytes(payload)
        self._path_sent = True
        self.calls += 1

    def poll(self, wait: float) -> Outcome | None:
        """The call's outcome once it has one (a report, or the process's death), else None."""
        import pickle

        if self._recv.poll(wait):
            try:
                status, value, err, tb, call_s = pickle.loads(self._recv.recv_bytes())
                return Outcome(CallStatus(status), value, err, tb, call_s=call_s)
            except (EOFError, OSError):  # died without reporting; a closed pipe polls readable
                pass
            except Exception as exc:  # noqa: BLE001 - a result that cannot be unpickled here
                return Outcome(CallStatus.EXCEPTION, error=f"the result could not be read: {type(exc).__name__}: {exc}")
        elif self.alive():
            return None
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pipe closed but still running: treat as hung
            return None
        status, reason = classify_exit(code)
        return Outcome(status, error=f"process {reason}")

    def wait(self, timeout: float, t0: float) -> Outcome:
        """Wait for the submitted call until `timeout` seconds after `t0`; kill the worker on timeout."""
        deadline = t0 + max(timeout, 0.1)
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                where = self.stack()
                self.kill()
                return Outcome(CallStatus.TIMEOUT, error=f"no result within {timeout:.0f} s; the worker was killed",
                               traceback=where, seconds=time.perf_counter() - t0)
            out = self.poll(min(left, 0.5))
            if out is not None:
                out.seconds = time.perf_counter() - t0
                return out

    def stack(self, wait_s: float = 1.0) -> str:
        """Where each of the (hung) worker's threads is, as Python stacks; "" if it cannot tell."""
        if not self.alive():
            return ""
        try:
            os.kill(self.pid, worker_side.STACK_SIGNAL)
        except OSError:
            return ""
        deadline, size = time.perf_counter() + wait_s, -1
        while time.perf_counter() < deadline:  # written from a signal handler: wait until it stops growing
            time.sleep(0.05)
            now = os.fstat(self._stack_fd).st_size
            if now and now == size:
                break
            size = now
        size = os.fstat(self._stack_fd).st_size
        text = os.pread(self._stack_fd, size, 0).decode(errors="replace") if size else ""
        return f"Python stacks of the worker's threads (pid {self.pid}) when it was stopped:\n{text}" if text else ""

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self._join(10)  # False only when unkillable (D state)
        self._close_pipes()

    def close(self, grace_s: float = 5.0) -> None:
        """Ask the worker to exit (its call pipe closes), then kill it after `grace_s`."""
        self._close_pipes()
        if not self._join(grace_s):
            self.kill()

    def _join(self, timeout: float) -> bool:
        """Wait until the process has ended (a forked worker's exit code may be reported later)."""
        if isinstance(self.proc, zygote.ForkedProcess):
            return self.proc.join(timeout)
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _close_pipes(self) -> None:
        for conn in (self._send, self._recv):
            if not conn.closed:
                conn.close()
        if self._stack_fd >= 0:
            os.close(self._stack_fd)
            self._stack_fd = -1


def _send_failed(exc: BaseException) -> Outcome:
    return Outcome(CallStatus.EXCEPTION, error=f"the call could not be sent to the worker ({type(exc).__name__}: {exc}); "
                                      "its function and arguments must be picklable by cloudpickle")


def run_in(worker: Worker, fn: Callable[..., Any], args: tuple, kwargs: dict, *, timeout: float,
           log_path: str | None, t0: float | None = None) -> Outcome:
    """One call in `worker`; a worker that died, hung or hit memory limits is killed."""
    t0 = time.perf_counter() if t0 is None else t0
    return _submit(worker, fn, args, kwargs, log_path, t0) or _finish(worker, timeout, t0)


def _submit(worker: Worker, fn: Callable[..., Any], args: tuple, kwargs: dict, log_path: str | None,
            t0: float) -> Outcome | None:
    """Hand the call to the worker; an Outcome only when it could not be handed over."""
    try:
        worker.submit(fn, args, kwargs, log_path)
    except BrokenPipeError:  # died before it read the call
        out = worker.poll(1.0) or Outcome(CallStatus.CRASH, error="process died before it read the call")
        out.seconds = time.perf_counter() - t0
        worker.kill()
        return out
    except Exception as exc:  # noqa: BLE001 - unpicklable function or argument
        return _send_failed(exc)
    return None


def _finish(worker: Worker, timeout: float, t0: float) -> Outcome:
    out = worker.wait(timeout, t0)
    if out.status in WORKER_LOST:
        worker.kill()  # a dead, hung or exhausted worker never serves another call
    return out


@dataclass
class Pending:
    """A call handed to a pool's worker (`WorkerPool.submit`), to `collect` later."""

    t0: float
    early: Outcome | None  # set when the call never reached the worker


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float, log_path: str | None = None,
                 env: dict[str, str] | None = None, **kwargs: Any) -> Outcome:
    """Call `fn(*args, **kwargs)` in a fresh worker process; never raises for the call's failures.

    The worker's stdout/stderr go to `log_path` when given. On timeout the worker is killed.
    `env` is added to the caller's environment.
    """
    t0 = time.perf_counter()
    worker = Worker(env=env, log_path=log_path)
    try:
        return run_in(worker, fn, args, kwargs, timeout=timeout, log_path=None, t0=t0)
    finally:
        worker.close(grace_s=10)


class WorkerPool:
    """A warm worker for call after call (one at a time), replaced after it dies.

    The worker starts on the first `call` (its start counts against that call's timeout),
    imports torch once, and keeps module-level state between calls. A raise inside `fn` is an
    `exception` outcome and the worker stays; a timeout, crash (signal, `os._exit`,
    `sys.exit`) or out-of-memory kills it and the next call gets a fresh one. Per-call
    stdout/stderr go to `log_path`; the worker's own output outside calls to
    `log_dir/worker-<n>.log` when `log_dir` is given.
    """

    def __init__(self, *, env: dict[str, str] | None = None, log_dir: str | Path | None = None) -> None:
        self.env = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else None
        self.worker: Worker | None = None
        self.started = 0  # workers started so far (a replacement counts)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker now (it imports torch while the caller does other work); optional."""
        if self.worker is None or not self.worker.alive():
            self._start()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float, log_path: str | None = None,
             **kwargs: Any) -> Outcome:
        return self.collect(self.submit(fn, *args, log_path=log_path, **kwargs), timeout=timeout)

    def submit(self, fn: Callable[..., Any], *args: Any, log_path: str | None = None, **kwargs: Any) -> Pending:
        """Hand a call to the worker and return at once: several pools' workers then work side by
        side (builds, never timing); `collect` waits for the outcome."""
        t0 = time.perf_counter()
        self.start()
        assert self.worker is not None
        return Pending(t0, _submit(self.worker, fn, args, kwargs, log_path, t0))

    def collect(self, pending: Pending, *, timeout: float) -> Outcome:
        """The outcome of `pending`, waiting until `timeout` seconds after it was submitted."""
        assert self.worker is not None
        out = pending.early or _finish(self.worker, timeout, pending.t0)
        if not self.worker.alive() or out.status in WORKER_LOST:
            self.worker.kill()
            self.worker = None
        return out

    def _start(self) -> None:
        if self.worker is not None:
            self.worker.kill()
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"worker-{self.started}.log"
        self.worker = Worker(env=self.env, log_path=log)
        self.started += 1

    @property
    def pid(self) -> int | None:
        """The live worker's process id (None before the first call or after a death)."""
        return self.worker.pid if self.worker is not None and self.worker.alive() else None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
