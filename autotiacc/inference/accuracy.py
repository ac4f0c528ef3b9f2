"""Accuracy guard: compare a candidate's outputs with the fp32 eager reference, like with like.

Every non-finite value of the reference (NaN, +inf, -inf: masked logits, log-probabilities)
must sit at the same position in the output, with the same sign; an output that differs there,
or holds a non-finite value where the reference is finite, fails with the count and the first
position. The error is computed over the finite positions only: relative L2 error per output
batch, ||y - ref|| / ||ref||, worst over the test data; also max absolute error and cosine
similarity. (Over whole tensors, one -inf in the reference made the error NaN, and a NaN error
compared as "not worse": the guard passed anything.) With a user `metric(outputs, targets)`
(higher is better) the guard is the metric's drop from the reference's value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..torch_compat import tree_flatten

# Default tolerance on relative L2 error: tight when precision must not change.
DEFAULT_TOLERANCE = {0: 1e-3, 1: 2e-2, 2: 2e-2}
_KINDS = ("finite", "NaN", "+inf", "-inf")  # value_kinds' codes, in order


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


def tensor_leaves(out: Any) -> list:
    import torch

    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def value_kinds(t: Any) -> Any:
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf (see `_KINDS`)."""
    import torch

    kinds = torch.zeros(t.shape, dtype=torch.int8)
    kinds[torch.isnan(t)] = 1
    kinds[t == float("inf")] = 2
    kinds[t == float("-inf")] = 3
    return kinds


def nonfinite_mismatch(got: Any, want: Any) -> str | None:
    """Where `got` (float64, CPU) holds a NaN/inf the reference `want` does not hold at the same
    position with the same sign, or a finite value where it holds one; None when they agree."""
    import torch

    kg, kw = value_kinds(got), value_kinds(want)
    differ = kg != kw
    count = int(differ.sum())
    if not count:
        return None
    first = int(differ.flatten().nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(got.shape))) if got.dim() else ()
    return (f"{count} position(s) where the output's non-finite values differ from the reference's, the first at "
            f"index {list(index)}: output {_KINDS[int(kg.flatten()[first])]}, "
            f"reference {_KINDS[int(kw.flatten()[first])]}")


def finite_errors(got: Any, want: Any) -> tuple[float, float, float]:
    """(relative L2 error, max abs error, cosine similarity) over the positions where the
    reference is finite (the output is too there, once `nonfinite_mismatch` found nothing)."""
    import torch

    mask = torch.isfinite(want)
    a, b = got[mask], want[mask]
    diff = a - b
    denom = b.norm().item()
    rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.numel() and denom > 0 else 1.0
    return rel, max_abs, cos


def compare_outputs(outputs: list[Any], references: list[Any], *, tolerance: float,
                    metric: Callable | None = None, targets: list[Any] | None = None) -> AccuracyReport:
    """Worst-case comparison over all test batches (see the module doc)."""
    rel_worst, abs_worst, cos_worst, worst = 0.0, 0.0, 1.0, -1
    for i, (out, ref) in enumerate(zip(outputs, references)):
        got, want = tensor_leaves(out), tensor_leaves(ref)
        if not want:
            return AccuracyReport(False, worst_batch=i, reason=f"batch {i}: the reference output holds no tensor "
                                  f"(the model returned {type(ref).__name__}); there is nothing to compare")
        if len(got) != len(want):
            return AccuracyReport(False, reason=f"batch {i}: {len(got)} output tensors, reference has {len(want)}")
        for j, (a, b) in enumerate(zip(got, want)):
            where = f"batch {i}" + (f", output {j}" if len(want) > 1 else "")
            if a.shape != b.shape:
                return AccuracyReport(False, worst_batch=i,
                                      reason=f"{where}: output shape {tuple(a.shape)} != reference {tuple(b.shape)}")
            a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
            mismatch = nonfinite_mismatch(a64, b64)
            if mismatch:
                return AccuracyReport(False, rel_l2=float("inf"), worst_batch=i, reason=f"{where}: {mismatch}")
            rel, mab, cos = finite_errors(a64, b64)
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
