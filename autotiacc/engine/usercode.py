"""The user's code (model.py, train.py) runs only in child processes, never in the tuner's own.

A model file can hang, exit, crash, or start a non-daemon thread at import that keeps the
process alive after `tune` has printed its result. So the tuner imports nothing of it: a child
imports the file and runs what is needed (`run_user_code`), and the tuner keeps only what the
child reports (facts, rows, shapes). Worker processes import it the same way (`load_module`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

from .. import errors
from ..errors import AutotiaccError, UserCodeTimeout, WorkloadError

STAGE_MARK = "autotiacc-stage: "  # a child's progress, on its stderr: read back when it is stopped
NO_EXIT = ("a model file must define functions, not end the process: put script code under "
           "`if __name__ == \"__main__\":`.")


def load_module(path: Path) -> types.ModuleType:
    """Import the user's Python file once per path (inference and training workloads share it)."""
    name = f"autotiacc_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkloadError(f"{path}: cannot be imported as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses / pickling inside user code need it registered
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise WorkloadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        del sys.modules[name]
        raise WorkloadError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    except SystemExit as exc:
        del sys.modules[name]
        raise WorkloadError(f"{path}: importing it called sys.exit({exc.code!r}); {NO_EXIT}") from None
    return module


def one_line(text: Any, limit: int = 300) -> str:
    """An exception's message as one line (torch's carry tracebacks and blank lines)."""
    return " ".join(str(text).split())[:limit]


class Stage:
    """Where a child is in the user's code: named in the message when that code raises or exits,
    and marked on stderr (seconds since the start, the stage) for `run_user_code` to read
    back when the child is stopped at its timeout."""

    def __init__(self, now: str = "importing it") -> None:
        import time

        self._t0, self._now = time.perf_counter(), ""
        self.now = now

    def __call__(self) -> str:
        return self._now

    @property
    def now(self) -> str:
        return self._now

    @now.setter
    def now(self, stage: str) -> None:
        import time

        self._now = stage
        print(f"{STAGE_MARK}{time.perf_counter() - self._t0:.3f} {stage}", file=sys.stderr, flush=True)


def stages_in(log: str) -> list[tuple[float, str]]:
    """The (seconds, stage) marks a child wrote (see `Stage`)."""
    out = []
    for line in log.splitlines():
        if line.startswith(STAGE_MARK):
            seconds, _, stage = line[len(STAGE_MARK):].partition(" ")
            out.append((float(seconds), stage))
    return out


def reported(fn: Callable[..., Any], *args: Any, where: Any, stage: Callable[[], str] | str = "running it",
             **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a child, its failures turned into {"error", "message"} for
    `run_user_code`: our errors by class name, the user's with `where` and the stage it was in."""
    try:
        return fn(*args, **kwargs)
    except AutotiaccError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - anything else of the user's code, with where it happened
        now = stage() if callable(stage) else stage
        return {"error": "WorkloadError", "message": f"{where}: {now} raised {type(exc).__name__}: {one_line(exc)}"}
    except SystemExit as exc:
        now = stage() if callable(stage) else stage
        return {"error": "WorkloadError", "message": f"{where}: {now} called sys.exit({exc.code!r}); {NO_EXIT}"}


def run_user_code(probe: Callable[..., Any], *args: Any, where: Any, stage: str, timeout: float,
                  limit: str = "") -> tuple[Any, float]:
    """Run `probe(*args)` (the user's code) in a child killed after `timeout` s.

    `probe` returns its result, or {"error": AutotiaccError subclass name, "message"} (see
    `reported`); those, hangs, `sys.exit`/`os._exit` and crashes become one clear error.
    Returns (result, the probe's own seconds in the child)."""
    from .workers import run_isolated

    fd, log = tempfile.mkstemp(prefix="autotiacc-check-", suffix=".log")
    os.close(fd)
    try:  # the child's output goes to a log: a torch loader's logged traceback is noise here
        outcome = run_isolated(probe, *args, timeout=timeout, log_path=log)
        text = Path(log).read_text(errors="replace") if not outcome.ok else ""
    finally:
        os.unlink(log)
    stages = stages_in(text)
    tail = [line for line in text.strip().splitlines() if not line.startswith(STAGE_MARK)][-1:]
    if outcome.ok and isinstance(outcome.value, dict) and "error" in outcome.value:
        cls = getattr(errors, outcome.value["error"], WorkloadError)
        raise cls(outcome.value["message"])
    if outcome.ok:
        return outcome.value, outcome.call_s or outcome.seconds
    if outcome.status == "timeout":
        raise UserCodeTimeout(f"{where}: {stage} did not finish within {timeout:.0f} s"
                              + (f" ({limit})" if limit else "") + " and was stopped"
                              + (f" in {stages[-1][1]}" if stages else "") + "; look for an endless loop or a "
                              "blocking call (sleep, input(), a lock) in it, or allow more time.", stages)
    if outcome.status == "exception":  # raised outside the probe: the arguments did not reach the child
        raise WorkloadError(f"{where}: could not be sent to a child process to run ({outcome.error}).")
    raise WorkloadError(f"{where}: the process ended while {stage} ({outcome.error}"
                        + (f"; last output: {tail[0][:200]}" if tail else "")
                        + f"): os._exit() or a crash in native code; {NO_EXIT}")
