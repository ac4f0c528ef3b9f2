"""Shared matplotlib set-up for reports and comparisons: one figure per file.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so
`optimize()` or a report never switches the caller's backend nor registers global figures."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def figure(path: Path, *, title: str, xlabel: str, ylabel: str = "",
           size: tuple[float, float] = (7, 4)) -> Iterator[object]:
    """Yield an Axes; on exit label it, lay it out, save it to `path` and free the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    yield ax
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
