"""The candidate groups for per-layer precision: modules that own parameters, coarsened to
blocks that each carry a real share of the forward."""
from __future__ import annotations

from typing import Any

MIN_GROUP_SHARE = 0.05  # a precision group carries at least this share of the forward


def candidate_groups(modules: list[dict[str, Any]], model: Any, *, coverage: float = 0.9,
                     max_groups: int = 8, min_share: float = MIN_GROUP_SHARE,
                     min_total: float = 0.5) -> list[dict[str, Any]]:
    """Per-layer precision candidates: modules that ran and own parameters, coarsened until
    each carries at least `min_share` of the forward's time or FLOPs (a 1.5 % convolution is
    not worth a search parameter; its block is). From the deepest such modules (a fused
    TransformerEncoderLayer counts as one: its children never run), each climbs to its
    nearest ancestor that ran until it reaches `min_share`; modules under another chosen one
    merge into it; those that cannot reach it are dropped. Largest share first, until they
    cover `coverage` of their total or `max_groups` are taken. None when together they carry
    less than `min_total` of the forward: per-layer precision would not pay there."""
    ran = {m["path"]: m for m in modules if m["calls"] > 0 and m["path"] and m["has_params"]}
    root_flops = next((m["flops"] for m in modules if m["path"] == ""), 0) or 0

    def share(m: dict[str, Any]) -> float:
        # time, or arithmetic where a noisy clock (a loaded machine) hides it: lower precision speeds both
        return max(m["inclusive_share"], m["flops"] / root_flops if root_flops else 0.0)

    blocks = [ran[p] for p in _blocks(ran, share, min_share)]
    blocks.sort(key=lambda m: (-share(m), m["path"]))  # ties in path order: the same groups every run
    total = sum(share(m) for m in blocks)
    if total < min_total:
        return []
    linear_paths = _linear_paths(model)
    out, covered = [], 0.0
    for m in blocks:
        if covered >= coverage * total or len(out) >= max_groups:
            break
        covered += share(m)
        out.append({"path": m["path"], "type": m["type"], "inclusive_share": m["inclusive_share"],
                    "flops": m["flops"], "linear": m["path"] in linear_paths})
    return out


def _blocks(ran: dict[str, dict[str, Any]], share, min_share: float) -> list[str]:
    """From each deepest module that ran, its nearest ancestor (or itself) reaching `min_share`;
    none of them under another."""
    leaves = [p for p in ran if not any(q.startswith(p + ".") for q in ran)]
    chosen = set()
    for p in leaves:
        while share(ran[p]) < min_share:
            up = next((a for a in _ancestors(p) if a in ran), None)
            if up is None:
                break
            p = up
        if share(ran[p]) >= min_share:
            chosen.add(p)
    return [p for p in chosen if not any(a in chosen for a in _ancestors(p))]


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['a.b', 'a'] (the model itself, '', excluded)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _linear_paths(model: Any) -> set[str]:
    import torch

    if not hasattr(model, "named_modules") or isinstance(model, torch.jit.ScriptModule):
        return set()
    return {p for p, m in model.named_modules() if type(m) is torch.nn.Linear}
