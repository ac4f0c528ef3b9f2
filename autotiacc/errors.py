"""One base error and narrow subclasses; messages name the argument, show the value, say the fix.

The CLI turns any `AutotiaccError` into one line on stderr and exit code 2.
"""
from __future__ import annotations


class AutotiaccError(Exception):
    """Base class of every error autotiacc raises on purpose."""


class UserInputError(AutotiaccError):
    """A flag, file or value given by the user is wrong; the message says how to fix it."""


class WorkloadError(UserInputError):
    """The user's model file cannot be loaded or does not follow the contract."""


class UserCodeTimeout(WorkloadError):
    """The user's code did not finish within its time in a child; `stages` are the (seconds,
    stage) marks it passed, so a caller can tell a hang from a model too slow for the budget."""

    def __init__(self, message: str, stages: list[tuple[float, str]] | None = None) -> None:
        super().__init__(message)
        self.stages = stages or []


class ModelRaisedError(WorkloadError):
    """The user's model raised on its own example inputs (a bug in the user's code)."""


class StrategyError(UserInputError):
    """A strategy YAML (preset or `--strategy FILE`) is malformed; refused before any work starts."""


class BudgetError(UserInputError):
    """The `--budget` string is malformed or too small for the work asked."""


class OutputError(AutotiaccError):
    """An output could not be written where asked, after the work; the message says where what
    was measured was kept (or that the inputs are unchanged)."""


class PlanError(AutotiaccError):
    """A plan file is missing, corrupt, of an unknown schema, or does not fit this machine."""


class PlanMismatchError(PlanError):
    """A plan was made on different hardware/software and `strict=True` was asked."""


class TrialError(AutotiaccError):
    """A candidate failed inside its isolated trial (exception, crash, hang, out of memory)."""

    def __init__(self, kind: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.traceback = traceback


class HardwareMismatchWarning(UserWarning):
    """A plan is applied on hardware or software other than the one it was measured on."""
