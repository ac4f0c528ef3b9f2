"""The run directory: created and checked before any work, locked for one tune at a time,
and its durable records (`run.json`, `trials.csv`) written atomically.

The lock is `fcntl.flock` on `DIR/.lock`: the kernel drops it when its holder dies, so a lock
left by a `kill -9`'d tune is simply taken over; the pid and host written inside only name
the holder in the refusal.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import UserInputError

LOCK_FILE = ".lock"


class RunDirLocked(UserInputError):
    """Another live tune holds this run directory."""


class RunDir:
    """One tune's folder. `open()` makes it and takes the lock; `close()` releases it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- set-up -----------------------------------------------------------------------------
    def open(self, *, resume: bool, shared: bool) -> "RunDir":
        """Make the folder and take its lock (a live holder is refused first), then refuse to
        start a new tune over a finished or interrupted one without --resume."""
        d = self.path
        if d.exists() and not d.is_dir():
            raise UserInputError(f"`--out` {d} is a file; give a directory (it is created if missing).")
        try:
            (d / "trials").mkdir(parents=True, exist_ok=True)
            self.lock()
        except OSError as exc:
            raise UserInputError(f"`--out` {d} is not writable: {exc.strerror or exc}.") from None
        if (d / "run.json").exists() and not resume and not shared:
            self.close()
            raise UserInputError(f"`--out` {d} already holds a tune; add --resume to continue it, or choose another --out.")
        return self

    def lock(self) -> None:
        """Take the directory's lock at once or refuse, naming the live holder."""
        import fcntl

        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirLocked(f"`--out` {self.path} is in use by a running tune ({holder}); wait for it to end, "
                               "or give another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- records ----------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def trial_log(self, name: str) -> str:
        return str(self.path / "trials" / f"{name}.log")

    def read_run(self) -> dict[str, Any]:
        p = self.path / "run.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except (OSError, ValueError):
            raise UserInputError(f"{p} is corrupt (not JSON); remove the run directory or give another --out.") from None

    def write_run(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path / "run.json", data)

    def start_session(self, data: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        """Write run.json with `data` and one more session; returns the whole record."""
        prev = self.read_run()
        data = {**data, "sessions": [*prev.get("sessions", []), session]}
        self.write_run(data)
        return data

    def update_session(self, **fields: Any) -> None:
        data = self.read_run()
        data["sessions"][-1].update(fields)
        self.write_run(data)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_trials_csv(study, path: Path) -> None:
    """One row per trial with its knobs, status, reason and figures (pandas, via Optuna)."""
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration",
                                       "datetime_start"))
    if "state" in df.columns:
        df = df[df["state"] != "WAITING"]  # enqueued but never started
    if "user_attrs_status" in df.columns:  # a queued starting point moved behind a retry (engine.study)
        df = df[df["user_attrs_status"] != "requeued"]
    df = df.rename(columns=lambda c: c.replace("user_attrs_", "").replace("params_", "param_"))
    df = df.drop(columns=[c for c in ("knobs", "key") if c in df.columns])
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
