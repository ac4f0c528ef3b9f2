"""The worker process's side of `workers.py`: read a call, run it, report, repeat.

Started as `python -c ...` with the call pipe's and the result pipe's file descriptors and the
parent's pid. Each message in is a cloudpickle of (sys.path or None, fn, args, kwargs,
log_path); each message out is a pickle of (status, value, error, traceback, seconds). The call pipe
closing (the parent closed the pool or died) ends the worker. The report's fifth field is the
call's own seconds, without the process's start.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from .status import CallStatus

# sent to the parent as plain words (a child need not unpickle enums); the parent reads CallStatus(word)
OK, OOM, EXCEPTION, CRASH = (CallStatus.OK.value, CallStatus.OOM.value, CallStatus.EXCEPTION.value,
                             CallStatus.CRASH.value)

_OOM_TEXT = "out of memory"


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when the tuner dies (kill -9 leaves no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


def _run(fn: Any, args: tuple, kwargs: dict) -> tuple[tuple, bool]:
    """((status, value, error, traceback), keep the worker) for one call."""
    try:
        return (OK, fn(*args, **kwargs), "", ""), True
    except MemoryError as exc:
        return (OOM, None, f"MemoryError: {exc}", traceback.format_exc()), False
    except Exception as exc:  # noqa: BLE001 - everything is reported to the parent
        msg = f"{type(exc).__name__}: {exc}"[:2000]
        if _OOM_TEXT in str(exc).lower():  # CUDA/allocator out of memory: start clean
            return (OOM, None, msg, traceback.format_exc()), False
        return (EXCEPTION, None, msg, traceback.format_exc()), True
    except SystemExit as exc:  # the code asked the process to end: honour it after reporting
        return (CRASH, None, f"the code called sys.exit({exc.code!r})", traceback.format_exc()), False
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt and the like
        return (CRASH, None, f"{type(exc).__name__}: {exc}", traceback.format_exc()), False


def _redirect(log_path: str | None, base: tuple[int, int]) -> None:
    """Point fds 1 and 2 at `log_path` (append), or back at the worker's own output."""
    sys.stdout.flush()
    sys.stderr.flush()
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    else:
        os.dup2(base[0], 1)
        os.dup2(base[1], 2)


def import_torch() -> None:
    """What every worker imports before its first call (the zygote, once for all of them)."""
    # torch.profiler's Kineto prints a USDT line per profiler start/stop on stderr (torch 2.13); the
    # profile reports what it could not measure itself. Read once, when torch loads: set it first.
    os.environ.setdefault("KINETO_LOG_LEVEL", "9")
    import cloudpickle  # noqa: F401
    import torch  # noqa: F401


STACK_SIGNAL = signal.SIGUSR2
STACK_FD_ENV = "AUTOTIACC_STACK_FD"


def _dump_stack_on_signal() -> None:
    """On STACK_SIGNAL, write every thread's Python stack to the descriptor $AUTOTIACC_STACK_FD
    (an unlinked file the caller holds open too): the caller asks for it before killing a hung
    call, so the timeout says where the call was stuck. faulthandler writes from the signal
    handler itself, so it works while the main thread blocks in C code holding the GIL."""
    fd = os.environ.get(STACK_FD_ENV)
    if fd:
        import faulthandler

        faulthandler.register(STACK_SIGNAL, file=int(fd), all_threads=True)


def main(argv: list[str]) -> None:
    call_fd, result_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    _dump_stack_on_signal()
    calls = Connection(call_fd, writable=False)
    results = Connection(result_fd, readable=False)
    base = (os.dup(1), os.dup(2))
    import_torch()  # once per worker, before the first call (a no-op where the zygote did it)
    import cloudpickle

    while True:
        try:
            path, fn, args, kwargs, log_path = pickle.loads(calls.recv_bytes())
        except (EOFError, OSError):  # the pool closed or the parent died
            break
        if path is not None:
            sys.path[:] = path
        t0 = time.perf_counter()
        report: tuple[Any, ...]
        try:
            _redirect(log_path, base)
        except OSError as exc:
            report, keep = (EXCEPTION, None, f"cannot write the call's log {log_path}: {exc}", ""), True
        else:
            report, keep = _run(fn, args, kwargs)
            _redirect(None, base)
        report = (*report, time.perf_counter() - t0)
        try:
            payload = cloudpickle.dumps(report)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is the call's failure
            payload = pickle.dumps((EXCEPTION, None, f"the result could not be sent back: "
                                    f"{type(exc).__name__}: {exc}", "", report[-1]))
        results.send_bytes(payload)
        if not keep:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: atexit hooks of the user's code ran nowhere else either
