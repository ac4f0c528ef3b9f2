"""What `autotiacc tune` prints at its end: the plan, its speed-up and whether that can be trusted,
where the run is, and the command's wall time against its budget."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .machine_load import verdict_line


def tune_lines(result: Any, written: dict[str, Path], budget_s: float) -> list[str]:
    """An inference tune's result (`SearchResult`) and the report files `written`."""
    p = result.plan
    flag = " (NOT RELIABLE: see below)" if p.unreliable else ""
    lines = [f"plan: {p.label}",
             f"speed-up: {p.speedup:.2f}x over eager fp32{flag} — {p.note}" if p.speedup else f"result: {p.note}"]
    if verdict_line(p.reliability):  # the figure's verdict, whenever the final judged it
        lines.append(f"measurement: {verdict_line(p.reliability)}")
    if p.shapes is not None:
        sh = p.shapes.measured
        p99 = f"{sh['p99_mix_ms']:.2f} ms" if sh.get("p99_mix_ms") is not None else "–"
        lines.append(f"dynamic shapes: {p.shapes.label}; the speed-up is over the traffic mix, p99 over the mix {p99}")
        if sh.get("samples_per_s"):
            lines.append(f"throughput: {sh['samples_per_s']:.0f} samples/s serving batches of {p.shapes.serve_batch}")
    return lines + [f"trials measured: {result.n_trials} in {result.wall_s:.0f}s (budget {budget_s:.0f}s)",
                    f"run directory: {result.run_dir}  (plan.json, trials.csv, {written['md'].name}, "
                    f"{written['html'].name})"]


def training_lines(result: Any, written: dict[str, Path], budget_s: float, nproc: int) -> list[str]:
    """A training tune's result (`TrainTuneResult`) and the report files `written`."""
    p = result.plan
    lines = [f"plan: {p.label}",
             f"samples/s: {p.speedup:.2f}x the baseline (num_workers=0, fp32) — {p.note}" if p.speedup and not
             math.isnan(p.speedup) else f"result: {p.note}"]
    if verdict_line(p.reliability):
        lines.append(f"measurement: {verdict_line(p.reliability)}")
    return lines + [f"trials measured: {result.n_trials} in {result.wall_s:.0f}s (budget {budget_s:.0f}s, "
                    f"{nproc} process(es))",
                    f"run directory: {result.run_dir}  (plan.json, trials.csv, {written['md'].name}, "
                    f"{written['html'].name})"]


def wall_line(started: float, budget_s: float) -> str:
    """The command's wall time (from `started`, time.monotonic()) against its budget, a bound:
    budget + max(5 %, 10 s)."""
    wall = time.monotonic() - started
    return f"wall time: {wall:.0f}s of a {budget_s:.0f}s budget ({100 * wall / budget_s:.0f} %)"
