"""`autotiacc compare`: one table and a few plots across tuning runs and experiment CSVs.

Inputs are run directories (run.json + plan.json + trials.csv) and/or CSV files written by
`experiments/` scripts (columns: model, batch, variant, median_ms, p90_ms, spread,
speedup_vs_eager, rel_err, setup_s). Everything is gathered into one DataFrame of rows
{source, model, batch, variant, median_ms, speedup, rel_err, setup_s, wall_s}, then drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from ..errors import UserInputError
from .plotting import figure


class CompareData(NamedTuple):
    rows: Any  # pandas.DataFrame: one row per (source, model, batch, variant)
    histories: dict[str, Any]  # run label -> DataFrame(number, speedup) of measured trials


def _from_run(d: Path) -> tuple[list[dict], Any]:
    from .inference import read_run_dir

    _, run, plan, trials = read_run_dir(d)
    wl = run.get("workload", {})
    label = f"{d.name}"
    wall = sum(float(s.get("wall_s") or 0) for s in run.get("sessions", []))
    compile_total = float(trials["build_s"].fillna(0).sum()) if "build_s" in trials else None
    rows = []
    if plan and (plan.get("baseline") or {}).get("median_ms"):
        b = plan["baseline"]
        best = plan.get("best") or b
        common = dict(source=label, model=wl.get("name"), batch=wl.get("batch_size"), wall_s=wall,
                      compile_total_s=compile_total, fingerprint=run.get("fingerprint", {}).get("cpu_model"))
        rows.append({**common, "variant": "eager fp32", "median_ms": b["median_ms"], "p90_ms": b.get("p90_ms"),
                     "spread": b.get("spread"), "speedup": 1.0, "rel_err": 0.0, "setup_s": 0.0})
        rows.append({**common, "variant": f"autotiacc: {plan.get('label')}", "median_ms": best["median_ms"],
                     "p90_ms": best.get("p90_ms"), "spread": best.get("spread"), "speedup": plan.get("speedup") or 1.0,
                     "rel_err": (plan.get("accuracy") or {}).get("rel_l2", 0.0), "setup_s": plan.get("compile_s")})
    hist = None
    if not trials.empty and "speedup" in trials and "status" in trials:
        hist = trials[trials["status"] == "ok"][["number", "speedup"]].sort_values("number")
    return rows, (label, hist)


def _from_csv(path: Path) -> list[dict]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ParserError, EmptyDataError are ValueErrors
        raise UserInputError(f"{path}: cannot be read as CSV ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}).") from None
    need = {"model", "variant", "median_ms"}
    if not need <= set(df.columns):
        raise UserInputError(f"{path}: not an experiment CSV (needs columns {sorted(need)}).")
    out = []
    for _, r in df.iterrows():
        out.append({"source": path.stem, "model": r["model"], "batch": r.get("batch"), "variant": r["variant"],
                    "median_ms": r["median_ms"], "p90_ms": r.get("p90_ms"), "spread": r.get("spread"),
                    "speedup": r.get("speedup_vs_eager"), "rel_err": r.get("rel_err"), "setup_s": r.get("setup_s"),
                    "wall_s": r.get("tune_wall_s"), "fingerprint": r.get("cpu_model")})
    return out


def gather(paths: list[str | Path]) -> CompareData:
    import pandas as pd

    rows, hists = [], {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and (p / "run.json").is_file():
            r, (label, hist) = _from_run(p)
            rows += r
            if hist is not None and not hist.empty:
                hists[label] = hist
        elif p.is_file() and p.suffix == ".csv":
            rows += _from_csv(p)
        else:
            raise UserInputError(f"{p}: neither a run directory (with run.json) nor an experiment .csv file.")
    if not rows:
        raise UserInputError("nothing to compare: the runs given have no plan with measurements yet.")
    return CompareData(pd.DataFrame(rows), hists)


def _case(df, with_source: str = "\n") -> list[str]:
    """'model bsN' labels; pandas keeps NaN through astype(str), so format row by row."""
    def one(r) -> str:
        b = r.get("batch")
        batch = f" bs{int(b)}" if b is not None and b == b else ""
        return f"{r.get('model')}{batch}{with_source}{r.get('source')}"
    return [one(r) for _, r in df.iterrows()]


def _short(variant: str) -> str:
    return "autotiacc (tuned plan)" if str(variant).startswith("autotiacc") else str(variant)


def plot_speedups(data: CompareData, path: Path) -> Path:
    df = data.rows.copy()
    df["case"] = _case(df)
    df["vlabel"] = df["variant"].map(_short)
    cases, variants = list(dict.fromkeys(df["case"])), list(dict.fromkeys(df["vlabel"]))
    width = 0.8 / max(len(variants), 1)
    with figure(path, title="Speed-up per model and variant", xlabel="model, batch and source",
                ylabel="speed-up over eager fp32 (x, same run)", size=(max(7, 1.6 * len(cases) + 2), 4.5)) as ax:
        for i, v in enumerate(variants):
            sub = df[df["vlabel"] == v].drop_duplicates("case").set_index("case")
            xs = [c for c, case in enumerate(cases) if case in sub.index]
            ax.bar([x + i * width - 0.4 + width / 2 for x in xs],
                   [float(sub.loc[cases[x], "speedup"]) for x in xs], width, label=v)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.legend(fontsize=7, ncol=2)
    return path


def plot_pareto(data: CompareData, path: Path) -> Path:
    df = data.rows.dropna(subset=["rel_err", "speedup"])
    with figure(path, title="Speed vs accuracy", xlabel="relative L2 error vs fp32 eager (log; 1e-9 = exact)",
                ylabel="speed-up over eager fp32 (x)", size=(7, 4.5)) as ax:
        for model, sub in df.groupby("model"):
            ax.scatter(sub["rel_err"].clip(lower=1e-9), sub["speedup"], label=str(model))
            for _, r in sub.iterrows():
                ax.annotate(_short(r["variant"])[:22], (max(r["rel_err"], 1e-9), r["speedup"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    return path


def plot_histories(data: CompareData, path: Path) -> Path | None:
    if not data.histories:
        return None
    with figure(path, title="Optimization histories", xlabel="trial", ylabel="best speed-up so far (x)",
                size=(7, 4.5)) as ax:
        for label, h in data.histories.items():
            ax.step(h["number"], h["speedup"].cummax(), where="post", label=label)
        ax.legend(fontsize=7)
    return path


def plot_cost(data: CompareData, path: Path) -> Path | None:
    df = data.rows[data.rows["variant"].str.startswith("autotiacc") & data.rows["wall_s"].notna()]
    if df.empty:
        return None
    labels = _case(df, " ")
    with figure(path, title="Tuning cost beside the gain", xlabel="seconds (label: speed-up gained)",
                size=(7, 4.5)) as ax:
        ax.barh(labels, df["wall_s"].astype(float), color="tab:grey", label="tuning wall time (s)")
        if "compile_total_s" in df:
            ax.barh(labels, df["compile_total_s"].fillna(0).astype(float), color="tab:orange",
                    label="of which build/compile (s)")
        for y, (w, s) in enumerate(zip(df["wall_s"].astype(float), df["speedup"].astype(float))):
            ax.text(w, y, f"  {s:.2f}x", va="center", fontsize=8)
        ax.legend(fontsize=7)
    return path


def write_comparison(paths: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Gather, draw, and write compare.md / compare.html / compare.csv into `out_dir`."""
    from .format import table
    from .inference import _html

    data = gather(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, draw in {"speedup.png": plot_speedups, "pareto.png": plot_pareto, "histories.png": plot_histories,
                       "cost.png": plot_cost}.items():
        p = draw(data, out / name)
        if p:
            images[name] = p
    cols = ["source", "model", "batch", "variant", "median_ms", "p90_ms", "spread", "speedup", "rel_err", "setup_s", "wall_s"]
    df = data.rows.reindex(columns=cols)
    df.to_csv(out / "compare.csv", index=False)
    table = table(cols, df.values.tolist())
    secs = [("Comparison", ["Speed-ups are relative to eager fp32 measured in the same run.", ""] + table)]
    md = ["# autotiacc comparison", "", *secs[0][1], "", *[f"![{n}]({n})" for n in images]]
    (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
    (out / "compare.html").write_text(_html("autotiacc comparison", secs, images), encoding="utf-8")
    return {"md": out / "compare.md", "html": out / "compare.html", "csv": out / "compare.csv", **images}
