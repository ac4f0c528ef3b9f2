"""Training report: report.md, report.html and plots from a training run directory alone.

Reuses the core report's table and HTML helpers; data is gathered once, then drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from .budget import budget_section
from .format import fmt, reliability_lines, seed_order_section, table
from .inference import read_run_dir, render
from .plotting import figure


class TrainReportData(NamedTuple):
    run_dir: Path
    run: dict[str, Any]
    plan: dict[str, Any] | None
    trials: Any  # pandas.DataFrame


def gather(run_dir: str | Path) -> TrainReportData:
    return TrainReportData(*read_run_dir(run_dir))


def _curves(data: TrainReportData) -> dict[str, list[float]]:
    p = data.plan or {}
    extra = p.get("extra") or {}
    out = {}
    for name, key in (("fp32 baseline", "reference_losses"), (f"plan: {p.get('label', '')}", "final_losses")):
        curves = extra.get(key)
        if curves:
            out[name] = curves[0]
    return out


def plot_loss(data: TrainReportData, path: Path) -> Path | None:
    curves = _curves(data)
    if not curves:
        return None
    with figure(path, title="Loss from the same seed and data order", xlabel="step",
                ylabel="training loss (rank 0)") as ax:
        for name, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name[:60])
        ax.legend(fontsize=7)
    return path


def plot_throughput(data: TrainReportData, path: Path) -> Path | None:
    t = data.trials
    if t.empty or "samples_per_s" not in t:
        return None
    ok = t[t["status"] == "ok"].sort_values("number")
    if ok.empty:
        return None
    with figure(path, title="Training throughput per trial", xlabel="trial", ylabel="samples/s (all ranks)") as ax:
        ax.scatter(ok["number"], ok["samples_per_s"], label="candidate")
        if "baseline_samples_per_s" in ok:
            ax.scatter(ok["number"], ok["baseline_samples_per_s"], marker="x", label="baseline, same process")
        ax.legend(fontsize=7)
    return path


PLOTS = {"loss.png": plot_loss, "throughput.png": plot_throughput}


def sections(data: TrainReportData) -> list[tuple[str, list[str]]]:
    p, run, t = data.plan, data.run, data.trials
    wl = run.get("workload", {})
    out: list[tuple[str, list[str]]] = []
    sess = run.get("sessions", [{}])
    out.append(("Run", [
        f"- training file: `{wl.get('file')}`, batch size {wl.get('batch_size')} per process, "
        f"{run.get('nproc')} process(es) (gloo on CPU), loss tolerance {run.get('tolerance')}",
        f"- max memory: {fmt(run.get('max_memory_mib'), '.0f')} MiB" if run.get("max_memory_mib") else "- max memory: no limit",
        *([f"- JPEG decoding on the device (decode=device): {run['device_decode']}"] if run.get("device_decode") else []),
        "- sessions: " + "; ".join(f"{s.get('started')} budget {fmt(s.get('budget_s'), '.0f')} s, wall "
                                  f"{fmt(s.get('wall_s'), '.0f')} s, stopped: {s.get('stop', 'running or killed')}"
                                  for s in sess),
        "- figures are samples/s over fixed windows of steps after warm-up, candidate and baseline interleaved in "
        "the same processes; only these side-by-side ratios are comparable across trials."]))
    if p is None:
        out.append(("Result", ["No plan yet: the tune is running or was interrupted; trials so far are below."]))
    else:
        fin = (p.get("extra") or {}).get("final") or {}
        b, best = p.get("baseline") or {}, p.get("best") or {}
        bw, cw = b.get("window_ms") or {}, best.get("window_ms") or {}
        rows = [["baseline (num_workers=0, fp32)", b.get("samples_per_s"), bw.get("spread"), bw.get("n"), 1.0,
                 ((p.get("extra") or {}).get("reference_losses") or [[None]])[0][-1]],
                [f"plan: {p.get('label')}", best.get("samples_per_s"), cw.get("spread"), cw.get("n"), p.get("speedup"),
                 (((p.get("extra") or {}).get("final_losses")) or [[None]])[0][-1]]]
        lines = [f"**{p.get('note', '')}**", ""] + table(
            ["variant", "samples/s", "spread (IQR/median)", "windows", "speed-up", "loss after guard steps"], rows)
        lines += reliability_lines(p)
        if fin:
            lines += ["", f"What bounds the plan's training: **{fin.get('bound')}** — loader alone "
                          f"{fmt(fin.get('loader_samples_per_s'))} samples/s, compute alone (held batches) "
                          f"{fmt(fin.get('compute_samples_per_s'))} samples/s (rank 0).",
                      f"Decoded-sample cache build: {fmt(fin.get('cache_build_s'))} s per process (not in the window "
                      "figures). Peak RSS: " + f"{fmt(fin.get('peak_rss_mib'), '.0f')} MiB.",
                      f"Modules kept in fp32 (overflow detected): {fin.get('fp32_modules') or 'none'}; "
                      f"checkpointed blocks: {fin.get('checkpoint_modules') or 'none'}."]
        out.append(("Result", lines))
        out += _per_rank(fin, "final re-measurement")
    if not t.empty and "status" in t:
        ok = t[t["status"] == "ok"]
        if not (p and (p.get("extra") or {}).get("final")) and not ok.empty:
            top = ok.sort_values("value", ascending=False).iloc[0] if "value" in ok else ok.iloc[0]
            out += _per_rank(top.to_dict(), f"trial {top['number']}, {top.get('label')}")
        if "speedup" in ok:
            ok = ok.sort_values("speedup", ascending=False)
        cols = ["number", "label", "speedup", "samples_per_s", "baseline_samples_per_s", "bound", "peak_rss_mib"]
        cols += ["eval_metric"] if "eval_metric" in t else []
        rank_cols = sorted(c for c in t.columns if c.startswith("rank") and c.endswith(("_samples_per_s", "_comm_share")))
        rows = [[r.get(c) for c in cols + rank_cols] for _, r in ok.head(12).iterrows()]
        out.append(("Top trials", table(["#", "candidate", "speed-up", "samples/s", "baseline samples/s", "bound",
                                          "peak RSS MiB"] + cols[7:] + rank_cols, rows)))
        bad = t[~t["status"].isin(["ok", "duplicate"]) & t["status"].notna()]
        rows = [[r["number"], r.get("label"), r["status"], str(r.get("reason", ""))[:300]] for _, r in bad.iterrows()]
        out.append(("Failed or rejected trials", table(["#", "candidate", "status", "reason"], rows) if rows else ["None."]))
    out += seed_order_section(run)
    out += budget_section(run)
    out.append(("Hardware and software fingerprint", [f"- {k}: {v}" for k, v in run.get("fingerprint", {}).items()]))
    return out


def _per_rank(fig: dict[str, Any], where: str) -> list[tuple[str, list[str]]]:
    """Per-rank samples/s, communication share (1 - step time without all-reduce / with) and loss."""
    ranks = sorted({int(c[4:].split("_")[0]) for c in fig if c.startswith("rank") and c.endswith("_samples_per_s")})
    if not ranks:
        return []
    rows = [[r, fig.get(f"rank{r}_samples_per_s"), fig.get(f"rank{r}_comm_share"), fig.get(f"rank{r}_loss")]
            for r in ranks]
    return [(f"Per-rank figures ({where})", table(["rank", "samples/s", "communication share", "loss"], rows))]


def write_training_report(run_dir: str | Path) -> dict[str, Path]:
    data = gather(run_dir)
    title = f"autotiacc training report — {data.run.get('workload', {}).get('name', data.run_dir.name)}"
    return render(data, PLOTS, sections(data), title)


def is_training_run(run_dir: str | Path) -> bool:
    p = Path(run_dir) / "run.json"
    try:
        data = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False  # the report's reader names what is wrong with it
    return isinstance(data, dict) and data.get("mode") == "train"


