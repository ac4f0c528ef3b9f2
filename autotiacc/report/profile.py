"""The report's profile part: top modules plot, error-vs-speed-up (Pareto) plot, and the
table of per-layer precision groups. Registered into `report.inference.PLOTS` and `sections`.

Works on `ReportData` (duck-typed: `.profile`, `.plan`, `.trials`); draws, never reads files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .format import table
from .plotting import figure


def plot_top_modules(data, path: Path, n: int = 12) -> Path | None:
    from ..profiling.schema import MODULE_METHODS, top_modules

    prof = getattr(data, "profile", None)
    if not prof or prof.get("method") not in MODULE_METHODS:
        return None
    mods = [m for m in top_modules(prof, n) if m["path"]][::-1]
    if not mods:
        return None
    labels = [f"{m['path']} [{m['type']}]" for m in mods]
    with figure(path, title=f"Top modules by self time (forward {prof['forward']['median_ms']:.3g} ms median)",
                xlabel="% of the measured forward time", size=(7, 0.38 * len(mods) + 1.6)) as ax:
        ax.barh(labels, [100 * m["inclusive_share"] for m in mods], color="tab:blue", alpha=0.35, label="inclusive")
        ax.barh(labels, [100 * m["self_share"] for m in mods], color="tab:blue", label="self")
        ax.legend(loc="lower right", fontsize=8)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both error (lower) and speed-up (higher)."""
    front = []
    for i, (e, s) in enumerate(points):
        if not any((e2 <= e and s2 >= s) and (e2 < e or s2 > s) for j, (e2, s2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(data, path: Path) -> Path | None:
    t = data.trials
    if t is None or t.empty or not {"rel_l2", "speedup", "status"} <= set(t.columns):
        return None
    ok = t[(t["status"] == "ok") & t["rel_l2"].notna() & t["speedup"].notna()]
    if ok.empty:
        return None
    layered = ok["label"].astype(str).str.contains("groups=") if "label" in ok else ok["speedup"] < 0
    floor = 1e-9  # exact results (error 0) still need a place on a log axis
    err = ok["rel_l2"].clip(lower=floor)
    with figure(path, title="Error vs speed-up across trials", xlabel="relative L2 error vs fp32 eager (log)",
                ylabel="speed-up (x, measured side by side)") as ax:
        ax.scatter(err[~layered], ok["speedup"][~layered], color="tab:gray", label="whole-model precision")
        ax.scatter(err[layered], ok["speedup"][layered], color="tab:orange", label="per-layer precision")
        pts = list(zip(err.tolist(), ok["speedup"].tolist()))
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:green", lw=1.5,
                drawstyle="steps-post", label="Pareto front")
        for (_, r), e in zip(ok.iterrows(), err):
            ax.annotate(str(int(r["number"])), (e, r["speedup"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.legend(loc="best", fontsize=8)
    return path


PROFILE_PLOTS = {"top_modules.png": plot_top_modules, "pareto.png": plot_pareto}


def _chosen_groups(plan: dict[str, Any] | None) -> tuple[dict[str, str], str] | None:
    """The plan's precision per group and for the groups it does not list (its global mode
    under int8_static, which lists the groups it keeps in fp32; else fp32)."""
    if not plan:
        return None
    for k in plan.get("knobs", []):
        if k.get("_type") == "PrecisionConfig":
            mode = k["_data"].get("mode", "fp32")
            return {p: m for p, m in k["_data"].get("groups", [])}, mode if mode == "int8_static" else "fp32"
    return {}, "fp32"


def _cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "–"
    err = s.get("rel_l2")
    shown = "inf" if err is None or (isinstance(err, float) and math.isinf(err)) else f"{err:.2g}"
    if s.get("ok"):
        return shown + (f" ({s['quick_speedup']:.2f}x)" if s.get("quick_speedup") else "")
    if str(s.get("reason", "")).startswith("far slower"):
        return f"far slower ({s.get('quick_speedup', 0):.2f}x)"
    return "overflow" if not s.get("finite", True) and "overflow" in s.get("reason", "") else f"excluded ({shown})"


def profile_sections(data) -> list[tuple[str, list[str]]]:
    """Markdown sections: the profile summary, the groups table, what was not available."""
    from ..profiling.sensitivity import ANALYSED_MODES
    from ..profiling.schema import opaque_root, top_modules

    prof = getattr(data, "profile", None)
    if not prof:
        return []
    fwd = prof.get("forward", {})
    lines = [f"- method: `{prof.get('method')}`; forward {fwd.get('median_ms', math.nan):.4g} ms median "
             f"(spread {fwd.get('spread', math.nan):.1%}, n={fwd.get('n')}), measured interleaved with the profiled forward",
             f"- module self-time shares add up to {prof.get('shares_sum', math.nan):.1%} of the measured forward"]
    lines += _attribution_lines(prof)
    lines += _diagnosis_lines(prof.get("diagnosis"))
    mem = prof.get("memory", {})
    if mem:
        lines.append(f"- parameters+buffers {mem.get('param_and_buffer_bytes', 0) / 2**20:.2f} MiB, activations "
                     f"{mem.get('activation_bytes', 0) / 2**20:.2f} MiB, peak allocated during one forward "
                     f"{mem.get('peak_forward_alloc_bytes', 0) / 2**20:.2f} MiB")
    if prof.get("gpu"):
        lines.append("- GPU during measurement (pynvml, median): "
                     + ", ".join(f"{k} {v:.4g}" for k, v in prof["gpu"].items()))
    rows = [[m["path"] or "(model)", m["type"], m["calls"], 100 * m["self_share"], 100 * m["inclusive_share"],
             m["flops"] / 1e6, m["activation_bytes"] / 2**10] for m in top_modules(prof, 12)]
    lines += [""] + table(["module", "type", "calls", "self %", "inclusive %", "MFLOP", "output KiB"], rows)
    if opaque_root(prof) and prof.get("ops"):
        lines += ["", "Operator table (torch.profiler):", ""]
        lines += table(["op", "calls", "self ms", "self %"],
                        [[o["op"], o["calls"], o["self_ms"], 100 * o["self_share"]] for o in prof["ops"]])
    out = [("Profile", lines)]
    sens = prof.get("sensitivity") or []
    if sens:
        chosen = _chosen_groups(data.plan)
        modes = [m for m in ANALYSED_MODES if any(m in g["sensitivity"] for g in sens)]
        rows = []
        for g in sens:
            pick = "–" if chosen is None else chosen[0].get(g["path"], chosen[1])
            cells = [_cell(g["sensitivity"].get(m)) if m in g["sensitivity"] or not g.get("skipped") else "not analysed"
                     for m in modes]
            rows.append([g["path"], g.get("type"), 100 * (g.get("inclusive_share") or 0.0), *cells, g.get("score"), pick])
        text = ["Each group lowered alone; cells are the relative L2 error of the model output and, in "
                "brackets, a short interleaved look at the whole model's speed-up (a hint for the search's "
                "starting point, not a result; where the group was far slower on every test batch, that ratio); "
                "`overflow`: inf/NaN appeared; `excluded`: failed or beyond tolerance; `far slower`: 5x the fp32 "
                "forward or more on two test batches, not offered; `not analysed`: left by a profile cut at its "
                "share of the budget, for a later tune. Score: time share per unit of the smallest allowed error. "
                "`int8_static`: the group alone in calibrated static int8 (an engine's quantizer); a group "
                "excluded there stays fp32 in int8_static candidates.", ""]
        text += table(["group", "type", "time %", *modes, "score", "chosen"], rows)
        out.append(("Per-layer precision", text))
    missing = [f"- {u}" for u in prof.get("unavailable") or []] + ([f"- {prof['partial']}"] if prof.get("partial") else [])
    if missing:
        out.append(("Not available in this profile", missing))
    return out


def _attribution_lines(prof: dict[str, Any]) -> list[str]:
    """How the attributed times relate to the plain forward (profiler_attribution only)."""
    if prof.get("method") != "profiler_attribution":
        return []
    cuda = str(prof.get("device", "")).startswith("cuda")
    work = "kernels" if cuda else "operators"
    return [f"- per-module time from torch.profiler: each {work[:-1]} attributed to the innermost module range "
            f"(no per-module synchronisation{', NVTX range per module' if prof.get('nvtx') else ''}); "
            f"{work} {prof.get('busy_ms', math.nan):.4g} ms of the forward; profiled forward / plain forward "
            f"{1 + (prof.get('timer_overhead') or 0):.2f} (the profiler's overhead, or noise below 1); time between "
            f"{work} scaled by {prof.get('idle_scale', math.nan):.2f} to the plain forward"]


def _diagnosis_lines(diag: dict[str, Any] | None) -> list[str]:
    """The stated diagnosis and the figures behind it."""
    if not diag:
        return []
    fig = diag.get("figures") or {}
    shown = {"forward_ms": ("forward", "{:.4g} ms"), "busy_ms": ("busy", "{:.4g} ms"),
             "busy_share": ("busy share", "{:.0%}"), "kernels_per_forward": ("kernels/forward", "{:.0f}"),
             "ops_per_forward": ("operators/forward", "{:.0f}"), "mean_kernel_us": ("mean kernel", "{:.3g} us"),
             "achieved_flops": ("achieved", "{:.3g} FLOP/s"), "flops_of_peak": ("of peak FP32", "{:.1%}"),
             "bytes_moved": ("bytes moved (lower bound)", "{:.3g} B"),
             "bandwidth_of_peak": ("of peak bandwidth", "{:.1%}"),
             "intensity_flop_per_byte": ("intensity", "{:.3g} FLOP/B")}
    parts = [f"{label} {fmt.format(fig[k])}" for k, (label, fmt) in shown.items() if fig.get(k) is not None]
    return [f"- **diagnosis: {diag.get('kind') or 'not decided'}**: {diag.get('reason', '')}",
            "- figures: " + ", ".join(parts)] + ([f"- **allocator**: {diag['allocator']}"] if diag.get("allocator") else [])
