"""Accuracy guard: compare a candidate's outputs with the fp32 eager reference.

Default measure: relative L2 error per output batch, ||y - ref|| / ||ref||, worst over the
test data; also max absolute error and cosine similarity. With a user `metric(outputs,
targets)` (higher is better) the guard is the metric's drop from the reference's value.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

# Default tolerance on relative L2 error: tight when precision must not change.
DEFAULT_TOLERANCE = {0: 1e-3, 1: 2e-2, 2: 2e-2}


@dataclass
class AccuracyReport:
    ok: bool
    rel_l2: float = 0.0
    max_abs: float = 0.0
    cosine: float = 1.0
    metric: float | None = None
    reference_metric: float | None = None
    worst_batch: int = -1
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _leaves(out: Any) -> list:
    import torch
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def compare_outputs(outputs: list[Any], references: list[Any], *, tolerance: float,
                    metric: Callable | None = None, targets: list[Any] | None = None) -> AccuracyReport:
    """Worst-case comparison over all test batches; non-finite output always fails."""
    import torch

    rel_worst, abs_worst, cos_worst, worst = 0.0, 0.0, 1.0, -1
    for i, (out, ref) in enumerate(zip(outputs, references)):
        got, want = _leaves(out), _leaves(ref)
        if not want:
            return AccuracyReport(False, worst_batch=i, reason=f"batch {i}: the reference output holds no tensor "
                                  f"(the model returned {type(ref).__name__}); there is nothing to compare")
        if len(got) != len(want):
            return AccuracyReport(False, reason=f"batch {i}: {len(got)} output tensors, reference has {len(want)}")
        for a, b in zip(got, want):
            if a.shape != b.shape:
                return AccuracyReport(False, worst_batch=i,
                                      reason=f"batch {i}: output shape {tuple(a.shape)} != reference {tuple(b.shape)}")
            a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
            if not torch.isfinite(a64).all() and torch.isfinite(b64).all():
                return AccuracyReport(False, rel_l2=math.inf, worst_batch=i,
                                      reason=f"batch {i}: non-finite values (inf/NaN) in the output")
            diff = (a64 - b64)
            denom = b64.norm().item()
            rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
            mab = diff.abs().max().item() if diff.numel() else 0.0
            cos = torch.nn.functional.cosine_similarity(a64.flatten(), b64.flatten(), dim=0).item() \
                if a64.numel() and denom > 0 else 1.0
            if rel > rel_worst:
                rel_worst, worst = rel, i
            abs_worst, cos_worst = max(abs_worst, mab), min(cos_worst, cos)
    report = AccuracyReport(True, rel_l2=rel_worst, max_abs=abs_worst, cosine=cos_worst, worst_batch=worst)
    if metric is not None and targets is not None:
        m_ref = float(sum(metric(r, t) for r, t in zip(references, targets)) / max(len(references), 1))
        m_out = float(sum(metric(o, t) for o, t in zip(outputs, targets)) / max(len(outputs), 1))
        report.metric, report.reference_metric = m_out, m_ref
        if not (m_ref - m_out <= tolerance):
            report.ok = False
            report.reason = f"metric {m_out:.5g} dropped {m_ref - m_out:.3g} from reference {m_ref:.5g} (tolerance {tolerance:g})"
        return report
    if not (rel_worst <= tolerance):
        report.ok = False
        report.reason = f"relative error {rel_worst:.3g} on test batch {worst} exceeds tolerance {tolerance:g}"
    return report
