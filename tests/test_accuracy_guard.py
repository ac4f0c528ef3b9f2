"""The accuracy guard compares like with like: NaN/±inf must sit where the reference has them
(same sign), and the error is taken over the finite positions only. Checked with hypothesis
against a plain NumPy oracle written from that rule (not from the code under test)."""
import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autotiacc.inference.accuracy import compare_outputs

NAN, INF = float("nan"), float("inf")
SPECIAL = {1: NAN, 2: INF, 3: -INF}  # the oracle's codes: 0 finite, 1 NaN, 2 +inf, 3 -inf


def _kinds(a: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(a), 1, np.where(a == np.inf, 2, np.where(a == -np.inf, 3, 0)))


def _oracle(outs: list[np.ndarray], refs: list[np.ndarray], tol: float):
    """(ok, worst finite rel. L2 error, (batch, first differing index, count) or None)."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(outs, refs)):
        differ = _kinds(a) != _kinds(b)
        if differ.any():
            return False, None, (i, [int(x) for x in np.argwhere(differ)[0]], int(differ.sum()))
        fin = np.isfinite(b)
        d = a[fin] - b[fin]
        norm = np.sqrt(np.sum(b[fin] ** 2))
        rel = np.sqrt(np.sum(d ** 2)) / norm if norm > 0 else np.sqrt(np.sum(d ** 2))
        worst = max(worst, rel)
    return worst <= tol, worst, None


@st.composite
def _batch(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    # on a 1e-3 grid: no subnormal squares, which the oracle's plain sums would flush to 0
    ref = draw(hnp.arrays(np.float64, shape, elements=st.integers(-10**5, 10**5).map(lambda v: v / 1000)))
    kinds = draw(hnp.arrays(np.int8, shape, elements=st.sampled_from([0, 0, 0, 1, 2, 3])))
    for code, value in SPECIAL.items():
        ref[kinds == code] = value
    noise = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
    scale = draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0]))
    out = np.where(np.isfinite(ref), ref + scale * noise, ref)
    if draw(st.booleans()):  # sometimes move, flip or drop a non-finite value
        flips = draw(hnp.arrays(np.int8, shape, elements=st.sampled_from([0] * 8 + [1, 2, 3, 4])))
        for code, value in SPECIAL.items():
            out[flips == code] = value
        out[flips == 4] = 0.5  # a finite value where the reference may hold a NaN/inf
    return out, ref


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(_batch(), min_size=1, max_size=3), tol=st.sampled_from([1e-3, 2e-2, 0.5]))
def test_guard_matches_numpy_oracle(batches, tol):
    outs, refs = [o for o, _ in batches], [r for _, r in batches]
    ok, worst, mismatch = _oracle(outs, refs, tol)
    assume(worst is None or abs(worst - tol) > 1e-9)  # no coin toss at the boundary
    rep = compare_outputs([torch.from_numpy(o) for o in outs], [torch.from_numpy(r) for r in refs], tolerance=tol)
    assert rep.ok == ok, (rep, ok, worst)
    if mismatch is not None:
        batch, index, count = mismatch
        assert rep.reason.startswith(f"batch {batch}: {count} position(s)") and f"index {index}" in rep.reason, rep
    else:
        assert np.isclose(rep.rel_l2, worst, rtol=1e-9, atol=1e-12), (rep.rel_l2, worst)


def test_masked_reference_is_no_longer_a_free_pass():
    """The issue's case: a -inf in the reference made the old guard return ok with rel_l2 0.0."""
    rep = compare_outputs([torch.tensor([[100., -50., -INF]])], [torch.tensor([[1., 2., -INF]])], tolerance=0.02)
    assert not rep.ok and rep.rel_l2 > 10
    same = compare_outputs([torch.tensor([[1.001, 2., -INF]])], [torch.tensor([[1., 2., -INF]])], tolerance=0.02)
    assert same.ok and 0 < same.rel_l2 < 1e-3


def test_nan_where_the_reference_has_minus_inf_names_the_position():
    rep = compare_outputs([torch.tensor([[0., NAN], [1., -INF]])], [torch.tensor([[0., -INF], [1., -INF]])],
                          tolerance=0.5)
    assert not rep.ok and "1 position(s)" in rep.reason and "index [0, 1]" in rep.reason
    assert "output NaN, reference -inf" in rep.reason
