"""profile.json: its schema, how it is written and read, the profile a failed run records, and
what its readers ask of it (top modules, the terminal summary, whether it is partial).

One file holds a profile (`forward`), its precision groups (`groups`), the sensitivity pass
(`sensitivity`, `search_groups`) and, where the pass was cut, `partial`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserInputError

SCHEMA = "autotiacc.profile"
SCHEMA_VERSION = 2  # 2: profiler attribution, busy time, diagnosis
PROFILE_FILE = "profile.json"
PROGRESS_FILE = "profile.partial.json"  # the profile so far, written by the isolated process after each step
METHOD = "profiler_attribution"
MODULE_METHODS = (METHOD, "module_timers")  # module_timers: schema 1 profiles
PARTIAL_WHY = "the profile's share of the budget ran out; a later tune of this workload on this machine completes it"


@dataclass
class ModuleStat:
    path: str  # module-tree path; "" is the model itself
    type: str
    calls: int = 0
    inclusive_ms: float = 0.0
    self_ms: float = 0.0
    inclusive_share: float = 0.0  # of the forward measured without timers
    self_share: float = 0.0
    flops: int = 0  # inclusive, per forward (torch.utils.flop_counter)
    param_bytes: int = 0  # inclusive: parameters and buffers of the subtree
    activation_bytes: int = 0  # bytes of this module's outputs, per forward
    has_params: bool = False
    busy_ms: float = 0.0  # self: in its own operators (CPU) or kernels (CUDA)
    device_events: float = 0.0  # self: kernels and copies per forward (CUDA)


def failed_profile(device: str, why: str) -> dict[str, Any]:
    """What profile.json holds when no profile could be made: no modules, no groups, and why."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device": device, "modules": [], "groups": [],
            "sensitivity": [], "search_groups": [], "unavailable": [f"the profile ({why}); per-layer precision not searched"]}


def save_profile(prof: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(prof, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def load_profile(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / PROFILE_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserInputError(f"`profile` {p}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                             "give a profile.json written by autotiacc.") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserInputError(f"`profile` {p}: not an autotiacc profile (missing \"schema\": \"{SCHEMA}\").")
    return data


def partial(prof: dict[str, Any]) -> bool:
    """The profiling step stopped before it finished (a group's sensitivity left to analyse)."""
    return bool(prof.get("partial")) or any(g.get("skipped") for g in prof.get("sensitivity") or [])


def done_steps(prof: dict[str, Any]) -> int:
    """How much of the work a profile holds: the profile itself, then one per analysed mode."""
    if partial(prof):
        return 1 + sum(len(g.get("sensitivity") or {}) for g in prof.get("sensitivity") or [])
    return 1 << 30  # complete


def top_modules(prof: dict[str, Any], n: int = 12, *, by: str = "self_share") -> list[dict[str, Any]]:
    """The `n` modules with the largest share (self time by default), root included."""
    mods = [m for m in prof.get("modules", []) if m.get("calls", 0) > 0]
    return sorted(mods, key=lambda m: -m.get(by, 0.0))[:n]


def opaque_root(prof: dict[str, Any]) -> bool:
    """True when the module breakdown says little (TorchScript, export, a flat forward): the
    model's own self time is most of the forward, so the operator table is the useful view."""
    root = next((m for m in prof.get("modules", []) if m["path"] == ""), None)
    return prof.get("method") not in MODULE_METHODS or (root is not None and root["self_share"] > 0.5)


def summary_lines(prof: dict[str, Any], n: int = 10) -> list[str]:
    """A few lines for the terminal: forward time, coverage, the top modules."""
    fwd = prof["forward"]
    lines = [f"forward: {fwd['median_ms']:.3f} ms median (spread {fwd['spread']:.1%}, n={fwd['n']}), "
             f"method {prof['method']}, module self-time shares add up to {prof['shares_sum']:.1%}"]
    for m in top_modules(prof, n):
        lines.append(f"  {m['self_share']:6.1%} self {m['inclusive_share']:6.1%} incl  {m['path'] or '(model)'}"
                     f"  [{m['type']}]  {m['flops'] / 1e6:.1f} MFLOP")
    if opaque_root(prof):
        lines.append("most time is inside the model's own forward (no submodule calls): top operators")
        lines += [f"  {o['self_share']:6.1%}  {o['op']}  x{o['calls']}" for o in prof.get("ops", [])[:n]]
    if prof.get("groups"):
        lines.append("precision groups: " + ", ".join(g["path"] for g in prof["groups"]))
    diag = prof.get("diagnosis")
    if diag:
        lines.append(f"diagnosis: {diag.get('kind') or 'not decided'}: {diag.get('reason', '')}")
        if diag.get("allocator"):
            lines.append(f"allocator: {diag['allocator']}")
    for what in prof.get("unavailable", []):
        lines.append(f"not available: {what}")
    for g in prof.get("sensitivity", []):
        lines.append(f"  sensitivity {g['path']}: allowed {', '.join(g['allowed']) or 'none'}; "
                     + "; ".join(f"{m} {s['rel_l2']:.2g}" + ("" if s["ok"] else f" ({s['reason'][:40]})")
                                 for m, s in g["sensitivity"].items()))
    return lines
