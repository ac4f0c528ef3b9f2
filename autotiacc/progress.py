"""The `tune` command's progress on the terminal (rich): the budget as the bar, trials done
and the best speed-up in the text, one line per trial."""
from __future__ import annotations

import time
from typing import Any


class ProgressBar:
    """Rich progress: budget as the bar, trials done and best speed-up in the text."""

    def __init__(self, budget_s: float, quiet: bool) -> None:
        self.quiet, self.budget_s, self.t0 = quiet, budget_s, time.monotonic()
        self.done, self.best = 0, 1.0
        self.progress = None
        if not quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task("tuning", total=budget_s, info="starting")
            self.progress.start()

    def __call__(self, e: dict[str, Any]) -> None:
        if self.progress is None:
            return
        elapsed = time.monotonic() - self.t0
        ev = e["event"]
        if ev == "trial_end":
            self.done += 1
            self.best = max(self.best, e.get("best_speedup") or 1.0)
            sp = e.get("speedup")
            self.progress.console.print(
                f"trial {e['number']:>3}: {e['status']:<9} "
                + (f"{sp:5.2f}x" if sp else "      ")
                + (f"  build {e['build_s']:.1f}s" if e.get("build_s") else "")
                + (f"  {e['reason'][:90]}" if e.get("reason") and e["status"] != "ok" else ""))
        elif ev == "trial_start":
            self.progress.console.print(f"trial {e['number']:>3}: {e['label']}", style="dim")
        elif ev == "final_start":
            self.progress.console.print("final re-measurement vs baseline: " + " | ".join(e["candidates"]))
        info = f"trials {self.done} · best {self.best:.2f}x · left {max(0, self.budget_s - elapsed):.0f}s"
        self.progress.update(self.task, completed=min(elapsed, self.budget_s), info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
