"""Shared matplotlib set-up for reports and comparisons: headless backend, one figure per file."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def figure(path: Path, *, title: str, xlabel: str, ylabel: str = "",
           size: tuple[float, float] = (7, 4)) -> Iterator[object]:
    """Yield an Axes; on exit label it, lay it out, save it to `path` and free the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
