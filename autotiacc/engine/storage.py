"""Several workers on one Optuna study (PostgreSQL, or any RDB URL given as `--storage`).

Optuna's RDB storage is the engine: each worker asks for its own trials, WAITING (enqueued)
trials are popped by exactly one worker (row lock), and heartbeats let a live worker fail the
trials of a dead one. What this module adds on top:
- only the worker that *created* the study enqueues the seed trials (creation is atomic in the
  database: a unique study name), so two workers starting at once never enqueue them twice;
- a trial's heartbeat runs while its isolated process runs; stale trials are failed with a
  reason (`interrupted`) and measured again (`engine.study.recover_interrupted`), never a live
  worker's trial;
- each worker's session and the final plan are kept in the study, so `autotiacc report
  --storage URL --study NAME` renders the same report from any machine.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from ..errors import UserInputError
from . import optuna_compat as compat

Direction = Literal["minimize", "maximize"]  # Optuna's study directions

DEFAULT_HEARTBEAT_S = 10
GRACE_FACTOR = 3  # a trial is stale after this many missed heartbeats


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def redact(url: str) -> str:
    """The storage URL (or a command line holding one) without its password, for messages and
    run.json. Up to the last `@` of the word: a raw `@` or `/` in a password is hidden too."""
    return re.sub(r"(://[^:/@\s]+):\S*@", r"\1:***@", url)


def open_storage(url: str, *, heartbeat_s: int = DEFAULT_HEARTBEAT_S):
    """An Optuna RDBStorage with heartbeats on; a bad URL or missing driver is a UserInputError."""
    import optuna
    import sqlalchemy.exc

    if heartbeat_s < 1:
        raise UserInputError(f"`--heartbeat` got {heartbeat_s!r}: use a whole number of seconds >= 1.")
    given, url = url, _with_driver(url)
    # ask/tell with our own heartbeat thread is what Study.optimize does inside; Optuna warns anyway.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # Optuna marks heartbeats experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, heartbeat_interval=int(heartbeat_s),
                                                      grace_period=int(heartbeat_s) * GRACE_FACTOR,
                                                      engine_kwargs={"pool_pre_ping": True})
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Two workers creating Optuna's tables at once: the loser retries and finds them.
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"`--storage` {redact(given)} cannot be opened ({first}); give an Optuna storage URL "
                             "such as postgresql://user:pass@host:5432/db or sqlite:///path/study.db.") from None


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; our extra installs psycopg2-binary,
    so name the driver that is importable."""
    import importlib.util

    if not url.startswith("postgresql://"):
        return url
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    if importlib.util.find_spec("psycopg") is not None:
        return url
    raise UserInputError(f"`--storage` {redact(url)} needs a PostgreSQL driver: "
                         "pip install 'autotiacc[postgres]' (psycopg2-binary).")


def create_or_load(storage, study_name: str, sampler, direction: Direction = "minimize") -> tuple[Any, bool]:
    """(study, created): `created` is True for exactly one of several workers starting at once."""
    import optuna

    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                    sampler=sampler, load_if_exists=False)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler), False


def wait_for_setup(study, timeout_s: float = 30.0) -> None:
    """A joining worker waits until the creator recorded the fingerprint, so the same-hardware
    check never passes just because it ran first."""
    t_end = time.monotonic() + timeout_s
    while "fingerprint" not in study.user_attrs and time.monotonic() < t_end:
        time.sleep(0.5)


def claim(study, trial) -> None:
    """Record a first heartbeat and the worker that took `trial`, right after `ask()`."""
    compat.record_heartbeat(study, trial)
    trial.set_user_attr("worker", worker_id())


def record_session(study, **fields: Any) -> None:
    """Start or update this worker's session record in the study."""
    key = f"session:{worker_id()}"
    data = dict(study.user_attrs.get(key) or {})
    data.update({k: redact(v) if isinstance(v, str) else v for k, v in fields.items()})
    data["worker"] = worker_id()
    study.set_user_attr(key, data)


def publish_run(study, run: dict[str, Any]) -> None:
    """What run.json holds that is the same for every worker of the study."""
    keys = ("workload", "fingerprint", "strategy", "level", "tolerance", "device", "study_name")
    study.set_user_attr("run", {k: run.get(k) for k in keys})


def publish_plan(study, plan_dict: dict[str, Any]) -> None:
    """The latest plan written by any worker (each one re-measures the study's best at its end)."""
    study.set_user_attr("plan", plan_dict)


def materialize_run_dir(storage_url: str, study_name: str, out_dir: str | Path) -> Path:
    """Write run.json, trials.csv and plan.json of a shared study into `out_dir`, so the usual
    report renders from the storage alone (any worker, any machine, same result)."""
    import optuna

    from .rundir import write_trials_csv

    out = Path(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserInputError(f"`--study` {study_name!r} is not in {redact(storage_url)}; "
                             f"studies there: {', '.join(names) or 'none'}.") from None
    attrs = study.user_attrs
    sessions = sorted((v for k, v in attrs.items() if k.startswith("session:")), key=lambda s: s.get("started", ""))
    run = {**(attrs.get("run") or {}), "storage": redact(storage_url), "study_name": study_name, "sessions": sessions}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    write_trials_csv(study, out / "trials.csv")
    plan = out / "plan.json"
    if attrs.get("plan"):
        plan.write_text(json.dumps(attrs["plan"], indent=2))
    elif plan.exists():
        plan.unlink()  # a stale plan from an earlier render would misreport the study
    return out
