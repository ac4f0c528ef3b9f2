"""Render a run directory into report.md, report.html (self-contained) and PNG plots.

Works from the run directory alone, also for partial runs (no plan.json yet). Data is
gathered once into `ReportData`, then drawn; drawing never reads files.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, NamedTuple

from .budget import budget_section
from ..errors import UserInputError
from .format import fmt, reliability_lines, seed_order_section, table
from .plotting import figure
from .profile import PROFILE_PLOTS, profile_sections


class ReportData(NamedTuple):
    run_dir: Path
    run: dict[str, Any]
    plan: dict[str, Any] | None
    trials: Any  # pandas.DataFrame
    importance: dict[str, float]
    profile: dict[str, Any] | None = None  # profile.json, when the tune wrote one


def _importance(run_dir: Path, run: dict[str, Any]) -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState

    storage = run.get("storage", "sqlite:///study.db")
    if storage == "sqlite:///study.db":
        if not (run_dir / "study.db").exists():
            return {}
        storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # scoped: the caller's own warning filters stay as they were
            warnings.filterwarnings("ignore", module="optuna")
            study = optuna.load_study(study_name=run.get("study_name", "autotiacc"), storage=storage)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(done) < 5:
                return {}
            return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001 - importance is optional decoration (needs variation in params)
        return {}


_DAMAGED = "the run directory is damaged; restore the file from a copy, or re-run the tune into a new --out"


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from a run directory; unreadable or not an object is a `UserInputError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                             f"{_DAMAGED}.") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: holds a {type(data).__name__}, not a JSON object; {_DAMAGED}.")
    return data


def read_trials_csv(path: Path):
    """trials.csv as a DataFrame (empty when missing or empty); unreadable is a `UserInputError`."""
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame()
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:  # created, never written: no trial finished yet
        return pd.DataFrame()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                             f"{_DAMAGED}.") from None
    if not df.empty and not {"number", "status"} <= set(df.columns):
        raise UserInputError(f"{path}: has no `number` and `status` columns, so it is not a tune's trials.csv; "
                             f"{_DAMAGED}.")
    return df


def read_run_dir(run_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None, Any]:
    """(folder, run.json, plan.json or None, trials.csv as a DataFrame, empty if none yet)."""
    d = Path(run_dir)
    if not (d / "run.json").is_file():
        raise UserInputError(f"{d}: not a run directory (no run.json); give the --out folder of a tune.")
    run = read_json_file(d / "run.json")
    for key, typ in (("workload", dict), ("fingerprint", dict), ("sessions", list)):
        if key in run and not isinstance(run[key], typ):
            raise UserInputError(f"{d / 'run.json'}: `{key}` holds a {type(run[key]).__name__}, not a "
                                 f"{typ.__name__}; {_DAMAGED}.")
    if not all(isinstance(x, dict) for x in run.get("sessions", [])):
        raise UserInputError(f"{d / 'run.json'}: `sessions` must be a list of objects; {_DAMAGED}.")
    plan = read_json_file(d / "plan.json") if (d / "plan.json").is_file() else None
    return d, run, plan, read_trials_csv(d / "trials.csv")


def gather(run_dir: str | Path) -> ReportData:
    d, run, plan, trials = read_run_dir(run_dir)
    profile = read_json_file(d / "profile.json") if (d / "profile.json").is_file() else None
    return ReportData(d, run, plan, trials, _importance(d, run), profile)


# -- plots -----------------------------------------------------------------------------------
def plot_history(data: ReportData, path: Path) -> Path | None:
    t = data.trials
    if t.empty or "speedup" not in t:
        return None
    with figure(path, title="Optimization history", xlabel="trial",
                ylabel="speed-up over baseline (x, measured side by side)") as ax:
        _draw_history(ax, t)
    return path


def _draw_history(ax, t) -> None:
    ok = t[t.get("status") == "ok"] if "status" in t else t
    ax.scatter(ok["number"], ok["speedup"], label="measured trial", color="tab:blue", zorder=3)
    bad = t[t["status"].isin(["failed", "rejected", "timeout", "crash", "oom", "exception"])] if "status" in t else t.iloc[0:0]
    if not bad.empty:
        ax.scatter(bad["number"], [1.0] * len(bad), marker="x", color="tab:red", label="failed / rejected", zorder=3)
    if not ok.empty:
        best = ok.sort_values("number")["speedup"].cummax()
        ax.step(ok.sort_values("number")["number"], best, where="post", color="tab:green", label="best so far")
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="baseline (eager fp32)")
    ax.legend(loc="best", fontsize=8)


def plot_latency(data: ReportData, path: Path) -> Path | None:
    p = data.plan
    if not p or not (p.get("baseline") or {}).get("samples_ms") or not (p.get("best") or {}).get("samples_ms"):
        return None
    import matplotlib

    horizontal = ({"orientation": "horizontal"} if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
                  else {"vert": False})
    how = ("each in its own process, in turns" if (p.get("extra") or {}).get("final_alternating")
           else "interleaved in one process")  # plans from before the alternating final
    with figure(path, title=f"Final re-measurement, {how}", xlabel="latency per call (ms)") as ax:
        ax.boxplot([p["baseline"]["samples_ms"], p["best"]["samples_ms"]], showfliers=True, **horizontal)
        ax.set_yticks([1, 2], ["baseline\n(eager fp32)", "best\n" + _wrap(p.get("label", ""))])
    return path


def plot_importance(data: ReportData, path: Path) -> Path | None:
    if not data.importance:
        return None
    items = sorted(data.importance.items(), key=lambda kv: kv[1])
    with figure(path, title="Parameter importance", xlabel="importance for latency (Optuna, sums to 1)",
                size=(7, 0.5 * len(items) + 1.5)) as ax:
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:purple")
    return path


def plot_cost(data: ReportData, path: Path) -> Path | None:
    t = data.trials
    if t.empty or "build_s" not in t or "speedup" not in t:
        return None
    ok = t[(t["status"] == "ok") & t["build_s"].notna()]
    if ok.empty:
        return None
    with figure(path, title="What each candidate cost to build vs what it gained", xlabel="build / compile time (s)",
                ylabel="speed-up (x)") as ax:
        ax.scatter(ok["build_s"], ok["speedup"], color="tab:orange")
        for _, r in ok.iterrows():
            ax.annotate(str(int(r["number"])), (r["build_s"], r["speedup"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    return path


PLOTS = {"history.png": plot_history, "latency.png": plot_latency, "importance.png": plot_importance,
         "cost.png": plot_cost}
PLOTS.update(PROFILE_PLOTS)


from .shapes import SHAPE_PLOTS, shape_sections  # noqa: E402 - dynamic-shape plots (traffic runs only)

PLOTS.update(SHAPE_PLOTS)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(", "), [], ""
    for w in words:
        if cur and len(cur) + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur}, {w}" if cur else w
    return "\n".join(lines + [cur])


# -- text ------------------------------------------------------------------------------------


def sections(data: ReportData) -> list[tuple[str, list[str]]]:
    """The report's content as (heading, markdown lines); shared by md and html."""
    p, run, t = data.plan, data.run, data.trials
    out: list[tuple[str, list[str]]] = []
    wl = run.get("workload", {})
    sess = run.get("sessions", [{}])
    head = [f"- model: `{wl.get('name')}` ({wl.get('kind')}), inputs {wl.get('input_shapes')} {wl.get('input_dtypes')}",
            f"- strategy `{run.get('strategy')}`, level {run.get('level')}, tolerance {run.get('tolerance')} (relative L2 error vs fp32 eager)"
            + (f"; accuracy guarded on {run['guard_data']}" if run.get("guard_data") else ""),
            "- sessions: " + "; ".join(f"{s.get('started')} budget {fmt(s.get('budget_s'), '.0f')} s, wall {fmt(s.get('wall_s'), '.0f')} s, stopped: {s.get('stop', 'running or killed')}" for s in sess)]
    out.append(("Run", head))
    if p is None:
        out.append(("Result", ["No plan yet: the tune is running or was interrupted. Trials so far are below; "
                               "`autotiacc tune ... --resume` continues it."]))
    else:
        b, best, acc = p.get("baseline") or {}, p.get("best") or {}, p.get("accuracy") or {}
        rows = [["baseline (eager fp32)", b.get("median_ms"), b.get("p90_ms"), b.get("p99_ms"), b.get("spread"), b.get("n"), 1.0, 0.0, "–"],
                [f"best: {p.get('label')}", best.get("median_ms"), best.get("p90_ms"), best.get("p99_ms"), best.get("spread"), best.get("n"),
                 p.get("speedup"), acc.get("rel_l2"), p.get("compile_s")]]
        lines = [f"**{p.get('note', '')}**", ""] + table(
            ["variant", "median ms", "p90 ms", "p99 ms", "spread (IQR/median)", "n", "speed-up", "rel. error", "build s"], rows)
        lines += reliability_lines(p)
        lines += ["", f"Plan: `plan.json` — knobs: {p.get('label')}; fell back to baseline: {p.get('fell_back')}."]
        out.append(("Result", lines + _twin_lines(p)))
    if not t.empty and "status" in t:
        ok = t[t["status"] == "ok"]  # no trial succeeded: no speed-up column at all
        ok = ok.sort_values("speedup", ascending=False).head(10) if "speedup" in ok else ok.iloc[0:0]
        rows = [[r["number"], r.get("label"), r.get("speedup"), r.get("latency_ms"), r.get("spread"), r.get("rel_l2"),
                 r.get("build_s"), r.get("peak_mem_mib"), "yes" if r.get("busy") is True else "–"]
                for _, r in ok.iterrows()]
        out.append(("Top trials", (table(["#", "candidate", "speed-up", "median ms", "spread", "rel. error", "build s",
                                          "peak MiB", "busy"], rows) if rows else ["No trial was measured successfully."])
                    + ["", "peak MiB: the candidate's peak memory above what its process held before building it "
                           "(CUDA: max_memory_allocated; CPU: resident-set high-water mark, coarse). busy: the "
                           "machine was busy while it was timed (other processes or steal took its cores)."]))
        bad = t[~t["status"].isin(["ok", "duplicate"]) & t["status"].notna()]
        rows = [[r["number"], r.get("label"), r["status"], str(r.get("reason", ""))[:300]] for _, r in bad.iterrows()]
        out.append(("Failed, rejected, pruned or skipped trials",
                    table(["#", "candidate", "status", "reason"], rows) if rows else ["None."]))
        graph = t[t["param_backend"] == "compile"] if "compile" in t and "param_backend" in t else t.iloc[0:0]
        if not graph.empty:
            out.append(("Compile statistics (torch.compile trials)",
                        table(["#", "candidate", "dynamo graphs / breaks / recompiles, calls that compiled"],
                               [[r["number"], r.get("label"), r["compile"]] for _, r in graph.iterrows()])))
    out += seed_order_section(run)
    out += shape_sections(data)
    out += profile_sections(data)
    out += budget_section(run)
    fp = run.get("fingerprint", {})
    out.append(("Hardware and software fingerprint", [f"- {k}: {v}" for k, v in fp.items()]))
    return out


def _twin_lines(plan: dict[str, Any]) -> list[str]:
    """What the spinning twins of ONNX Runtime finalists gave in the final (`inference.twins`)."""
    twins = {n: r["twin"]["spinning"] for n, r in ((plan.get("extra") or {}).get("final") or {}).items()
             if (r or {}).get("twin")}
    return ["", "ONNX Runtime finalists were also timed with spinning pool threads (ORT's default), alone in "
            "their own processes; the plan keeps spinning only if that is faster beyond noise:", ""] + [
        f"- {n}: spinning {fmt(t.get('ratio'), '.3f')}x the baseline's latency ({t.get('status')}"
        + (f": {t.get('reason')}" if t.get("reason") else "") + f"), {'kept' if t.get('kept') else 'not kept'}"
        for n, t in twins.items()] if twins else []


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Draw plots and write report.md and report.html; returns what was written."""
    data = gather(run_dir)
    return render(data, PLOTS, sections(data), f"autotiacc report — {data.run.get('workload', {}).get('name', data.run_dir.name)}")


def render(data: Any, plots: dict[str, Any], secs: list[tuple[str, list[str]]], title: str) -> dict[str, Path]:
    """Draw `plots` from `data` and write report.md + self-contained report.html into data.run_dir."""
    d = data.run_dir
    images = {}
    for name, draw in plots.items():
        try:
            path = draw(data, d / name)
        except Exception as exc:  # noqa: BLE001 - one broken plot must not lose the report
            path = None
            print(f"autotiacc report: plot {name} skipped ({type(exc).__name__}: {exc})")
        if path:
            images[name] = path
    md = [f"# {title}", ""]
    for heading, lines in secs:
        md += [f"## {heading}", "", *lines, ""]
    if images:
        md += ["## Plots", ""] + [f"![{n}]({n})" for n in images] + [""]
    (d / "report.md").write_text("\n".join(md), encoding="utf-8")
    (d / "report.html").write_text(_html(title, secs, images), encoding="utf-8")
    return {"md": d / "report.md", "html": d / "report.html", **images}


def _html(title: str, secs: list[tuple[str, list[str]]], images: dict[str, Path]) -> str:
    # markdown-it-py (CommonMark + GFM tables) comes with rich; raw HTML in cells stays escaped.
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, lines in secs:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(md.render("\n".join(lines)))
    for name, path in images.items():
        b64 = base64.b64encode(Path(path).read_bytes()).decode()
        body.append(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
