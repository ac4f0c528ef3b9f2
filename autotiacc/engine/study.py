"""The Optuna study of a tune: opened or resumed, checked against the machine and workload it
was measured on, and cleared of trials a killed tuner (or a dead peer worker) left running.

A trial left RUNNING never finished: it is failed with status `interrupted` and its
configuration is enqueued again, so the next session measures it rather than taking the
failed record for a duplicate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserInputError
from . import optuna_compat as compat
from .status import TrialStatus
from .storage import Direction, create_or_load, open_storage, wait_for_setup

REQUEUED = TrialStatus.REQUEUED.value
INTERRUPTED = TrialStatus.INTERRUPTED.value


@dataclass
class StudySpec:
    storage: str | None  # None: sqlite:///RUN_DIR/study.db
    study_name: str
    direction: Direction
    seed: int = 0
    heartbeat_s: int = 10
    resume: bool = False

    @property
    def shared(self) -> bool:
        return self.storage is not None


def open_study(spec: StudySpec, db_path, sampler) -> tuple[Any, bool]:
    """(study, created). With `--storage` the study may be shared by several workers (see
    `engine.storage`); `created` is True for the one worker that made it."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.shared:
        assert spec.storage is not None  # shared means a storage URL was given
        storage = open_storage(spec.storage, heartbeat_s=spec.heartbeat_s)
        study, created = create_or_load(storage, spec.study_name, sampler, direction=spec.direction)
        if not created:
            wait_for_setup(study)
        return study, created
    url = f"sqlite:///{db_path.resolve()}"
    try:
        existed = db_path.exists() and any(s.study_name == spec.study_name
                                           for s in optuna.get_all_study_summaries(url))
        study = optuna.create_study(study_name=spec.study_name, storage=url, direction=spec.direction,
                                    sampler=sampler, load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{db_path} is not a readable Optuna study ({first[:120]}); remove the run directory "
                             "or give another --out.") from None
    if study.direction.name.lower() != spec.direction:
        raise UserInputError(f"{db_path} holds a study of another kind of tune (it {study.direction.name.lower()}s); "
                             "give another --out.")
    return study, not existed


# Workload fields that must match for a resumed study's figures to stay comparable.
_SAME = {"param_shapes_sha256": "a different model (parameter shapes differ)",
         "batch_size": "batch size {old!r}; this run asks for {new!r} (--batch-size)",
         "input_shapes": "input shapes {old}; this run has {new} (--input-shape / example_inputs)",
         "input_dtypes": "input dtypes {old}; this run has {new} (--input-dtype)",
         # the same parameter shapes are not the same model: ReLU swapped for Tanh changes every figure
         "file_sha256": "the model file as it was then (sha256 {old:.12}...); it has changed since "
                        "(sha256 {new:.12}... now)"}


def check_same_setup(study, fingerprint: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to continue a study measured on other hardware/software or another workload."""
    from ..hardware import fingerprint_differences

    old_fp = study.user_attrs.get("fingerprint")
    if old_fp:
        diffs = fingerprint_differences(old_fp, fingerprint)
        if diffs:
            raise UserInputError("this study was measured on other hardware/software, figures would not be "
                                 "comparable: " + "; ".join(diffs) + ". Use another --study or --out.")
    old = study.user_attrs.get("workload") or {}
    for key, what in _SAME.items():
        if key in old and key in identity and old[key] != identity[key]:
            raise UserInputError("this study tuned " + what.format(old=old[key], new=identity[key])
                                 + "; its trials are not comparable: resume with the same settings or give another --out.")


def record_setup(study, fingerprint: dict[str, Any], identity: dict[str, Any], **attrs: Any) -> None:
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("workload", identity)
    for k, v in attrs.items():
        study.set_user_attr(k, v)


def recover_interrupted(study, *, shared: bool) -> list[int]:
    """Fail the trials that can never finish and enqueue their configurations again.

    Own storage (SQLite): every RUNNING trial was left by a killed session of this tune.
    Shared storage: only trials whose worker stopped sending heartbeats; a live peer's
    trials are left alone. Returns the numbers of the failed trials.
    """
    from optuna.trial import TrialState

    if shared:
        ids = compat.stale_trial_ids(study)
        reason = "its worker stopped sending heartbeats (killed or lost) while this trial ran"
        numbers = [compat.trial_number(study, i) for i in ids]
    else:
        numbers = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        reason = "the tune was interrupted while this trial ran; measured again after --resume"
    failed = []
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n in numbers:
        if compat.fail_trial(study, n, status=INTERRUPTED, reason=reason):
            failed.append(n)
            # a trial killed between `ask` and its last suggestion holds only some of its params;
            # an enqueued one keeps all of them in its fixed params until it finishes
            params = {**compat.waiting_params(by_number[n]), **by_number[n].params}
            if params:  # the one who failed it measures it again (an atomic state change: once)
                study.enqueue_trial(params, user_attrs={"retry_of": n})
    if failed and not shared:
        _queue_behind_retries(study)
    return failed


def _queue_behind_retries(study) -> None:
    """Optuna hands out queued trials oldest first, so starting points a killed session never
    reached would run before the retries and a short resume might never measure what was in
    flight. Queue them again behind the retries; the old entries are closed as `requeued`
    (own storage only: on a shared study a peer may be taking them right now)."""
    from optuna.trial import TrialState

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    first_retry = min((t.number for t in waiting if "retry_of" in t.user_attrs), default=None)
    for t in waiting:
        if first_retry is None or t.number > first_retry or "retry_of" in t.user_attrs:
            continue
        params = compat.waiting_params(t)
        if compat.fail_trial(study, t.number, status=REQUEUED, reason="queued again behind the interrupted trial"):
            study.enqueue_trial(params, user_attrs=dict(t.user_attrs))