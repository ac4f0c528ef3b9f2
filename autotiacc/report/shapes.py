"""Report parts for plans tuned on traffic: per-bucket table, traffic histogram with bucket
edges, latency vs shape. Everything is read from the plan's `shapes` (schema version 2) or
`extra["shapes"]` (version 1), gathered once by `report.inference.gather`; these functions only draw
and format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .format import fmt, table


def _shapes(data) -> dict[str, Any] | None:
    """The plan's shapes section as one flat mapping: the bucket set and the figures measured
    on it (version 2 keeps them apart under `measured`; version 1 side by side)."""
    p = data.plan or {}
    sh = p.get("shapes") if p.get("schema_version") != 1 else (p.get("extra") or {}).get("shapes")
    if not isinstance(sh, dict):
        return None
    figures = sh.get("measured") if isinstance(sh.get("measured"), dict) else sh
    return {**sh, **figures, "bucket_rows": figures.get("buckets") if isinstance(figures.get("buckets"), list) else []}


def _histogram_plot(data, path: Path, pick) -> Path | None:
    """Traffic share per size of one dim, the plan's bucket edges as dashed lines."""
    sh = _shapes(data)
    if not sh or not sh.get("traffic"):
        return None
    name = pick(list(sh["edges"]))
    if name is None:
        return None
    from .plotting import figure

    hist: dict[int, float] = {}
    for row in sh["traffic"]:
        hist[row[name]] = hist.get(row[name], 0.0) + row["weight"]
    xs = sorted(hist)
    with figure(path, title=f"Traffic histogram of {name} and the plan's bucket edges", xlabel=name,
                ylabel="share of requests") as ax:
        width = max(0.8, (max(xs) - min(xs)) / 60) if len(xs) > 1 else 0.8
        ax.bar(xs, [hist[x] for x in xs], width=width, color="tab:blue", label="traffic share")
        for i, e in enumerate(sh["edges"][name]):
            ax.axvline(e, color="tab:red", ls="--", lw=1, label="bucket edge (≤)" if i == 0 else None)
        ax.legend(fontsize=8)
    return path


def plot_traffic(data, path: Path) -> Path | None:
    """The first named dynamic dim (e.g. seq_len), or the batch size when there is none."""
    return _histogram_plot(data, path, lambda names: next((n for n in names if n != "batch_size"), names[0]))


def plot_traffic_batch(data, path: Path) -> Path | None:
    """The batch size, when the traffic also has named dims (else plot_traffic shows it)."""
    return _histogram_plot(data, path, lambda names: "batch_size" if len(names) > 1 else None)


def plot_latency_vs_shape(data, path: Path) -> Path | None:
    """Median latency per traffic shape, eager baseline vs the plan, against input elements."""
    sh = _shapes(data)
    per = (sh or {}).get("per_shape")
    if not per:
        return None
    from .plotting import figure

    rows = {f"b{r['batch_size']}x" + "x".join(f"{n}{r[n]}" for n in sorted(k for k in r if k not in ("batch_size", "weight"))): r
            for r in sh["traffic"]}
    size = {k: _elements(rows.get(k), sh) for k in per}
    keys = sorted(per, key=lambda k: size[k])
    with figure(path, title="Latency vs shape: per-shape medians, eager fp32 and the plan",
                xlabel="batch size x dynamic dims (elements per request)", ylabel="median latency (ms)") as ax:
        ax.plot([size[k] for k in keys], [per[k]["baseline_ms"] for k in keys], "o-", color="grey", label="eager fp32")
        ax.plot([size[k] for k in keys], [per[k]["median_ms"] for k in keys], "o-", color="tab:green", label="plan")
        ax.legend()
    return path


def _elements(row: dict | None, sh: dict) -> int:
    if not row:
        return 0
    n = 1
    for name in sh["edges"]:
        n *= int(row[name])
    return n


def shape_sections(data) -> list[tuple[str, list[str]]]:
    sh = _shapes(data)
    if not sh:
        return []
    lines = [f"- buckets: {sh.get('label')}",
             f"- p99 over the traffic mix: {fmt(sh.get('p99_mix_ms'))} ms; padding waste (share of input elements "
             f"fed that were padding, counted on the real padded tensors): {fmt(sh.get('padding_waste'))}",
             f"- traffic: {len(sh.get('traffic') or [])} shapes; requests beyond the largest edges run the "
             "unoptimized model with a one-time warning."]
    if sh.get("serve_batch"):
        lines.append(f"- throughput objective: serving batches of {sh['serve_batch']}, {fmt(sh.get('samples_per_s'))} "
                     f"samples/s; p99 budget {fmt(sh.get('p99_budget_ms'))} ms; figures above are ms per sample.")
    lines.append("")
    rows = [[b["bucket"], "specialised, padded" if b["padded"] else "shared, exact shape", b.get("knobs") or "plan's",
             len(b["shape_keys"]), b["traffic_share"], b.get("baseline_ms"), b.get("latency_ms"), b.get("build_s")]
            for b in sh["bucket_rows"]]
    if rows:
        lines += table(["bucket", "graph", "knobs", "traffic shapes", "traffic share", "eager ms (weighted)",
                         "plan ms (weighted)", "build s"], rows)
    return [("Dynamic shapes: buckets", lines)]


SHAPE_PLOTS = {"traffic.png": plot_traffic, "traffic_batch.png": plot_traffic_batch,
               "latency_vs_shape.png": plot_latency_vs_shape}
