"""The batched Gram GM (fused sweeps) against the single solver and an independent reference.

Tolerance: the batched solver runs the single solver's float64 iterations in batched kernels
(bmm instead of mv, a chunked Gram sum), so the iterates agree to float64 rounding and the
medians to float32 rounding of X^T alpha: rtol 1e-5 / atol 1e-6 on the medians, and the same
iteration counts except where a stopping test sits within rounding of its threshold (+-1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbgmd.core import geometric_median
from fedbgmd.core.batched_gm import batched_geometric_median

FLT_MAX = float(np.finfo(np.float32).max)


def _weiszfeld_ref(x: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Plain float64 Weiszfeld from the coordinate-wise median (independent of fedbgmd)."""
    y = np.median(x, axis=0)
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
        w = 1.0 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(y_new - y) <= 1e-13 * max(1.0, np.linalg.norm(y)):
            return y_new
        y = y_new
    return y


def _problems(seed: int, runs: int, n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(runs, n, k, generator=g)
    x[1, :2] *= 50.0  # two far rows
    if runs > 2:
        x[2] += 1e3  # a large common offset
    return x


@pytest.mark.parametrize("n,k", [(5, 40), (32, 700)])
def test_batched_equals_single_gram_solver(n: int, k: int) -> None:
    x = _problems(0, 4, n, k)
    res = batched_geometric_median(x)
    for r in range(x.shape[0]):
        one = geometric_median(x[r], solver="gram")
        torch.testing.assert_close(res.median[r], one.median, rtol=1e-5, atol=1e-6)
        assert abs(int(res.iterations[r]) - one.iterations) <= 1
        assert bool(res.converged[r]) == one.converged


def test_batched_matches_float64_reference() -> None:
    x = _problems(1, 3, 7, 30).double()
    res = batched_geometric_median(x, eps=1e-10, max_iter=5000)
    for r in range(3):
        ref = _weiszfeld_ref(x[r].numpy())
        np.testing.assert_allclose(res.median[r].numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_finite_extremes_do_not_capture_the_batched_median(where: str) -> None:
    """Two of ten rows at 1e20 and FLT_MAX (issue 13): the median stays with the honest rows."""
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(8, 64, generator=g)
    bad = torch.stack([torch.full((64,), 1e20), torch.full((64,), FLT_MAX)])
    pos = {"first": 0, "middle": 4, "last": 8}[where]
    x = torch.cat([honest[:pos], bad, honest[pos:]]).unsqueeze(0)
    res = batched_geometric_median(x.double())
    ref = _weiszfeld_ref(honest.double().numpy())
    # the breakdown bound: within the honest rows' spread, nowhere near the extremes
    assert float(torch.linalg.vector_norm(res.median[0] - torch.from_numpy(ref))) < 5.0
    assert bool(res.gram_ok[0])


def test_weights_zero_removes_a_row() -> None:
    x = _problems(2, 2, 6, 50)
    w = torch.ones(2, 6)
    w[:, 0] = 0.0
    res = batched_geometric_median(x, weights=w)
    for r in range(2):
        one = geometric_median(x[r, 1:], solver="gram")
        torch.testing.assert_close(res.median[r], one.median, rtol=1e-5, atol=1e-6)


def test_overflowing_gram_is_reported() -> None:
    x = torch.randn(2, 4, 64, dtype=torch.float64)
    x[1, 0] = 1e200  # its products overflow float64: G is not finite for run 1
    res = batched_geometric_median(x)
    assert res.gram_ok.tolist() == [True, False]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\(R, n, k\)"):
        batched_geometric_median(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights"):
        batched_geometric_median(torch.zeros(2, 3, 4), weights=torch.ones(3))
