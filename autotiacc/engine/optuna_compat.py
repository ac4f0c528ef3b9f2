"""Every use of Optuna's private API, in one place (tested with optuna 3.6 to 5.x).

Ask/tell with our own isolated workers needs a few things Optuna keeps private: the storage
behind a study, a trial's storage id, the heartbeat thread `Study.optimize` runs, the stale
trials of dead workers. If Optuna moves them, this is the only module to change.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator


def trial_id(trial) -> int:
    """The storage id of a live `Trial` or a `FrozenTrial`."""
    return trial._trial_id


def heartbeat_enabled(study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def stale_trial_ids(study) -> list[int]:
    """RUNNING trials whose worker stopped sending heartbeats (none without heartbeats)."""
    if not heartbeat_enabled(study):
        return []
    return list(study._storage._get_stale_trial_ids(study._study_id))


def record_heartbeat(study, trial) -> None:
    if heartbeat_enabled(study):
        study._storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def heartbeat_thread(study, trial) -> Iterator[None]:
    """Keep `trial` alive in the storage while the block runs (a no-op without heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def fail_trial(study, number_or_id: int, *, status: str, reason: str, by_id: bool = False) -> bool:
    """Mark an unfinished trial FAIL with a status and reason, written before the state flips
    (a finished trial's attributes are frozen). False when another process finished it first:
    the state change is atomic, so two workers doing this at once fail it once."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    tid = number_or_id if by_id else storage.get_trial_id_from_study_id_trial_number(study._study_id, number_or_id)
    try:
        storage.set_trial_user_attr(tid, "status", status)
        storage.set_trial_user_attr(tid, "reason", reason)
        return bool(storage.set_trial_state_values(tid, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def waiting_params(trial) -> dict[str, Any]:
    """The parameters an enqueued (WAITING) trial will be asked with: Optuna keeps them in a
    system attribute until the trial starts."""
    return dict(trial.system_attrs.get("fixed_params") or {})


def trial_number(study, tid: int) -> int:
    return study._storage.get_trial_number_from_id(tid)


def tpe_sampler(seed: int):
    """TPE over the joint space (`group` is marked experimental by Optuna; quiet it)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=4)
