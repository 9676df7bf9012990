"""Geometric median oracle: optimality, equivariances, solvers, convergence reporting."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from fedbgmd.core import geometric_median, get_aggregator
from fedbgmd.core.gram import medoid

# the package re-exports the function under the module's name; fetch the module itself
gm_module = importlib.import_module("fedbgmd.core.geometric_median")


def _subgradient_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    diff = y - x
    dist = diff.norm(dim=1, keepdim=True)
    return float((diff / dist).sum(dim=0).norm())


def _data(n: int, d: int, seed: int, outliers: int = 0, scale: float = 1e6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:outliers] += scale / d**0.5
    return x


@pytest.mark.parametrize("solver", ["direct", "gram"])
def test_optimality(solver: str) -> None:
    x = _data(15, 40, 0)
    r = geometric_median(x, eps=1e-12, solver=solver)
    assert r.converged and r.solver == solver
    assert _subgradient_norm(x, r.median) < 1e-4
    assert abs(r.objective - float((x - r.median).norm(dim=1).sum())) < 1e-8 * r.objective
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        y = r.median + 1e-3 * torch.randn(40, generator=g, dtype=torch.float64)
        assert float((x - y).norm(dim=1).sum()) >= r.objective
    assert abs(float(r.weights.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("solver", ["direct", "gram"])
def test_collinear_points_give_1d_median(solver: str) -> None:
    t = torch.tensor([-3.0, 0.5, 2.0, 7.0, 100.0], dtype=torch.float64)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    u = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    x = a + t[:, None] * u
    x = x.repeat(1, 4) if solver == "gram" else x  # gram needs d >= 4n only for auto; any d works
    r = geometric_median(x, eps=1e-12, solver=solver)
    want = (a + 2.0 * u).repeat(1, 4)[0] if solver == "gram" else a + 2.0 * u
    torch.testing.assert_close(r.median, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["direct", "gram"])
def test_translation_and_rotation_equivariance(solver: str) -> None:
    x = _data(9, 6, 3)
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    b = 50.0 * torch.randn(6, generator=g, dtype=torch.float64)
    base = geometric_median(x, eps=1e-13, solver=solver).median
    moved = geometric_median(x + b, eps=1e-13, solver=solver).median
    rotated = geometric_median(x @ q, eps=1e-13, solver=solver).median
    torch.testing.assert_close(moved, base + b, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated, base @ q, rtol=0, atol=1e-6)


def test_three_point_example_converges() -> None:
    # Triangle with a 125° angle at the origin: the geometric median is that vertex (0, 0).
    # Weiszfeld from the centroid approaches it slowly; stopping after 3 iterations (as one anchor
    # library does) leaves it 0.1 away. Defaults must converge and say so.
    a = math.radians(125.0)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [math.cos(a), math.sin(a)]], dtype=torch.float64)
    truncated = geometric_median(x, max_iter=3, init="mean", solver="direct", check_every=1)
    assert not truncated.converged
    assert float(truncated.median.norm()) > 0.05
    for solver in ("direct", "gram"):
        for init in ("mean", "median"):
            r = geometric_median(x, solver=solver, init=init)
            assert r.converged
            assert float(r.median.norm()) < 1e-4


@pytest.mark.parametrize("outliers", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_agree(outliers: int, dtype: torch.dtype) -> None:
    x = _data(12, 300, 5, outliers=outliers).to(dtype)
    a = geometric_median(x, solver="direct", eps=1e-10)
    b = geometric_median(x, solver="gram", eps=1e-10)
    assert a.converged and b.converged
    spread = float((x[outliers:] - x[outliers:].mean(0)).norm(dim=1).median())
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    assert float((a.median - b.median).norm()) < tol * spread
    assert abs(a.objective - b.objective) <= tol * 1e-2 * a.objective


def test_gram_precision_with_large_common_offset_and_hidden_spike() -> None:
    # rows share a huge offset; the outliers differ from the honest bulk only in column 1, which
    # the column sketch does not see, so the first centre is an outlier and G must be recentred.
    g = torch.Generator().manual_seed(11)
    n, d = 12, 8192
    x = 1e3 + torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:5] = x[5:].mean(0)
    x[:5, 1] += 1e6
    x32 = x.float()
    a = geometric_median(x32.double(), solver="direct", eps=1e-12)
    b = geometric_median(x32, solver="gram", eps=1e-10)
    assert float((a.median - b.median.double()).norm()) < 1e-3 * float(x[5:].std(0).norm())


def test_non_convergence_reported() -> None:
    x = _data(20, 30, 6, outliers=8)
    for solver in ("direct", "gram"):
        r = geometric_median(x, max_iter=1, solver=solver, check_every=1)
        assert not r.converged and r.iterations == 1
        assert bool(torch.isfinite(r.median).all()) and float(r.median.norm()) > 0
        out = get_aggregator("gm", max_iter=1, solver=solver, check_every=1)(x)
        assert not out.converged


def test_auto_solver_choice_and_validation() -> None:
    assert geometric_median(torch.randn(4, 16)).solver == "gram"
    assert geometric_median(torch.randn(5, 16)).solver == "direct"
    with pytest.raises(ValueError):
        geometric_median(torch.randn(3, 2), solver="magic")
    with pytest.raises(ValueError):
        geometric_median(torch.randn(3, 2), eps=0.0)
    with pytest.raises(ValueError):
        geometric_median(torch.randn(3, 2), weights=torch.tensor([1.0, -1.0, 1.0]))


def test_reported_objective_is_accurate_for_large_float32_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # force the direct solver's float32 path (used above 2**24 entries) on a smaller input
    monkeypatch.setattr(gm_module, "_DIRECT_FLOAT64_NUMEL", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 120_000, generator=g)
    x[:2] += 100.0
    for solver in ("direct", "gram"):
        r = geometric_median(x, solver=solver, init="mean")
        exact = float(torch.stack([(row.double() - r.median.double()).norm() for row in x]).sum())
        assert abs(r.objective - exact) <= 1e-7 * exact


@pytest.mark.parametrize("solver", ["direct", "gram"])
@pytest.mark.parametrize("init", ["median", "mean"])
def test_a_start_on_a_non_optimal_row_leaves_it(solver: str, init: str) -> None:
    # (0,0), (1,0), (0,1): the coordinate-wise median start is the row (0, 0), which is not the
    # median ((3 - √3)/6 on both axes). Plain smoothed Weiszfeld gives that row the weight 1/ν and
    # crept away by ~ν per step: it stopped after 8 iterations at (1e-7, 1e-7), "converged".
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    r = geometric_median(x, solver=solver, init=init)
    assert r.converged
    want = (3.0 - math.sqrt(3.0)) / 6.0
    torch.testing.assert_close(
        r.median, torch.full((2,), want, dtype=torch.float64), atol=2e-6, rtol=0
    )
    assert _subgradient_norm(x, r.median) < 1e-4
    assert abs(float(r.weights.sum()) - 1.0) < 1e-12 and bool((r.weights > 0).all())


@pytest.mark.parametrize("solver", ["direct", "gram"])
def test_a_row_that_is_the_median_stays_the_median(solver: str) -> None:
    # Vardi–Zhang: y stays on a row exactly when the pull of the others is at most its weight
    x = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [1.0, 1.0, 1.0], [-0.5, -2.0, -1.0]],
        dtype=torch.float64,
    )
    r = geometric_median(x, solver=solver)
    assert r.converged and float(r.median.norm()) < 1e-5  # gram approaches it from the mean
    # duplicated rows: every row at the iterate, nothing to divide by
    same = torch.ones(4, 3, dtype=torch.float64)
    s = geometric_median(same, solver=solver, init="mean")
    assert s.converged and torch.equal(s.median, same[0])


@pytest.mark.parametrize("big", [1e6, 1e13, 1e16, 1e18, 1e20])
def test_gram_solver_with_far_finite_outliers(big: float) -> None:
    # 3 of 10 rows at a huge finite value (a hostile client's). The gram solver used to return
    # the iterate with the least computed objective, whose rounding noise (~1e-16 · big) beat the
    # inliers' progress: 0.35 off at 1e13, 45 off at 1e16; from 1e18 its float32 products
    # overflowed. Now: the last iterate, and the direct solver when G is not finite.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5000, generator=g) * 0.01
    x[:3] = big
    ref = geometric_median(x.double(), solver="direct", eps=1e-12).median
    r = geometric_median(x)  # auto: gram, as d >= 4n
    assert r.converged and bool(torch.isfinite(r.median).all())
    assert r.solver == ("gram" if big < 1e18 else "direct")
    # the median is 0.31 from the honest mean; float32 output resolution is ~1e-6 here
    assert float((r.median.double() - ref).norm()) < 1e-5


FLT_MAX = float(np.finfo(np.float32).max)


def _reference_gm(x: np.ndarray, w: np.ndarray, iters: int = 20_000) -> np.ndarray:
    """Plain Weiszfeld in float64 numpy from the honest-looking coordinate-wise median, written
    here independently of fedbgmd (no row ever sits on the iterate in these tests)."""
    y = np.median(x, axis=0)
    for _ in range(iters):
        dist = np.sqrt(((x - y) ** 2).sum(axis=1))
        beta = w / np.maximum(dist, 1e-300)
        new = (beta / beta.sum()) @ x
        if np.linalg.norm(new - y) <= 1e-15 * max(np.median(dist), 1e-300):
            return new
        y = new
    return y


def _extremes(case: str, n: int, place: str) -> tuple[list[int], list[list[float]]]:
    """Rows to overwrite (first, last or in the middle) and the finite extremes they get."""
    values = {
        "1e20_and_flt_max": [[1e20], [FLT_MAX]],
        "mixed_signs": [[FLT_MAX], [-FLT_MAX], [-1e20, 1e20]],
        "half_minus_one_at_flt_max": [[FLT_MAX]] * ((n - 1) // 2),
    }[case]
    k = len(values)
    start = {"first": 0, "last": n - k, "middle": (n - k) // 2}[place]
    return list(range(start, start + k)), values


@pytest.mark.parametrize("place", ["first", "middle", "last"])
@pytest.mark.parametrize("case", ["1e20_and_flt_max", "mixed_signs", "half_minus_one_at_flt_max"])
@pytest.mark.parametrize("d", [64, 5000])
@pytest.mark.parametrize("solver", ["gram", "direct"])
def test_finite_extremes_do_not_capture_the_median(
    solver: str, d: int, case: str, place: str
) -> None:
    # issue 13: with one row at 1e20 and one at FLT_MAX, every row's sum of distances was ~1e40,
    # the medoid search tied and centred G on a Byzantine row (GM step 2.9e13, honest 0.096),
    # and 12 of 25 rows at FLT_MAX left the mean-started gram solver unconverged. d = 64 keeps G
    # finite in float64 (the branch a GPU takes up to d = 4M); at d = 5000 the float32 chunk
    # products overflow and the call goes to the direct solver.
    n = 25 if case.startswith("half") else 10
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g) * 0.01
    rows, values = _extremes(case, n, place)
    for r, v in zip(rows, values):
        x[r] = torch.tensor(v * (d // len(v)) + v[: d % len(v)])
    r = geometric_median(x, solver=solver)
    assert bool(torch.isfinite(r.median).all())
    ref = _reference_gm(x.double().numpy(), np.ones(n))
    honest = np.delete(x.double().numpy(), rows, axis=0)
    spread = float(np.linalg.norm(honest - honest.mean(0), axis=1).max())
    err = float(np.linalg.norm(r.median.double().numpy() - ref))
    assert err < 1e-4 * spread, (err, spread, r.solver, r.iterations)
    assert r.converged


@pytest.mark.parametrize("solver", ["gram", "direct"])
@pytest.mark.parametrize("place", ["first", "last"])
@pytest.mark.parametrize("big", [1e30, FLT_MAX])
def test_a_far_row_holding_almost_half_the_weight_does_not_capture_the_median(
    solver: str, place: str, big: float
) -> None:
    # issue 13: a client holding 45 of 93 of the weight at a huge finite value moved the
    # mean-started gram solver by 9.4e11 (here: unconverged after 1,000 iterations, 88 off at
    # 1e30, 3e10 at FLT_MAX)
    g = torch.Generator().manual_seed(4)
    n, d = 10, 64
    x = torch.randn(n, d, generator=g) * 0.01
    w = torch.full((n,), 48.0 / 9)
    far = 0 if place == "first" else n - 1
    x[far], w[far] = big, 45.0
    r = geometric_median(x, weights=w, solver=solver)
    ref = _reference_gm(x.double().numpy(), w.double().numpy())
    assert r.converged
    assert float(np.linalg.norm(r.median.double().numpy() - ref)) < 1e-5
    assert float(r.median.double().abs().max()) < 1.0  # in the honest rows' range, not ~1e20


def test_the_centre_is_the_least_weighted_median_distance() -> None:
    # rows 0 and 1 far out (one of them huge): by sum of distances every row scores ~the huge
    # distance, by weighted median distance only the three close rows score small
    dist = torch.tensor(
        [
            [0.0, 1e40, 1e20, 1e20, 1e20],
            [1e40, 0.0, 1e40, 1e40, 1e40],
            [1e20, 1e40, 0.0, 2.0, 1.0],
            [1e20, 1e40, 2.0, 0.0, 1.5],
            [1e20, 1e40, 1.0, 1.5, 0.0],
        ],
        dtype=torch.float64,
    )
    w = torch.full((5,), 0.2, dtype=torch.float64)
    # weighted median distances (3 of the 5 rows must be in the ball): 1e20, 1e40, 2, 2, 1.5;
    # sums of distances: rows 0, 2, 3, 4 all 2e39 to float64 resolution (the old argmin: row 0)
    sums = (dist @ w).tolist()
    assert sums[0] == sums[2] == sums[3] == sums[4]
    assert medoid(dist, w) == 4
