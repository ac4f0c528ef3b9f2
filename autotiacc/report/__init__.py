"""Reports: a run directory (inference or training) rendered into markdown, HTML and PNG plots,
and the comparison of several runs. `format` holds the table helpers every report shares."""
from .compare import write_comparison
from .inference import write_report
from .training import is_training_run, write_training_report

__all__ = ["write_report", "write_training_report", "is_training_run", "write_comparison"]
