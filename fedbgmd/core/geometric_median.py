r"""Geometric median oracle GM(ε) by smoothed Weiszfeld iterations (SPEC §3.1).

Problem: given rows :math:`x_1, \dots, x_n \in \mathbb{R}^d` and weights :math:`w_i \ge 0`
(default 1), find :math:`y^\star = \arg\min_y f(y)`, :math:`f(y) = \sum_i w_i \lVert y - x_i\rVert_2`.

Smoothed Weiszfeld (Weiszfeld 1937; smoothing as in Pillutla, Kakade & Harchaoui, "Robust
Aggregation for Federated Learning", IEEE TSP 2022):

.. math::
    \beta_i^{(t)} = \frac{w_i}{\max(\lVert x_i - y^{(t)}\rVert, \nu)}, \qquad
    y^{(t+1)} = \frac{\sum_i \beta_i^{(t)} x_i}{\sum_i \beta_i^{(t)}}

for the rows farther than ν > 0 from the iterate (rows within ν count as at it: see the
Vardi–Zhang step below; no division by zero). Stop when the
relative change of the objective :math:`|f(y^{(t-1)}) - f(y^{(t)})| \le \varepsilon f(y^{(t)})`
*and* the relative change of the iterate :math:`\lVert y^{(t)} - y^{(t-1)}\rVert \le \varepsilon
\max(\mathrm{med}_i \lVert x_i - y^{(t)}\rVert, \nu)` (the objective alone is dominated by far
outliers, so it would stop while the iterate still moves on the inliers' scale), or after
``max_iter`` updates; on non-convergence the last iterate is returned with ``converged=False``
(never a zero vector). Weiszfeld decreases f monotonically, so the last iterate is the best so
far; both solvers return it rather than the argmin of noisy objective values (with far outliers
f is dominated by their distances and its rounding noise exceeds the inliers' progress).

A row within ν of the iterate is handled by the Vardi–Zhang modification (Vardi & Zhang, "The
multivariate L1-median and associated data depth", PNAS 2000): it is left out of the Weiszfeld
map T, and the step is :math:`y \leftarrow (1-\lambda) T(y) + \lambda y`,
:math:`\lambda = \min(1, \eta / \lVert R(y)\rVert)` with η its weight and R(y) the pull of
the other rows, so an iterate on a non-optimal row (a coordinate-wise median start often is one)
leaves it at once instead of creeping away by ~ν per step; with no row at the iterate the step is
plain Weiszfeld.

Two solvers compute the same iterates:

* ``direct`` works on the (n, d) matrix: each iteration reads the data twice (distances, then the
  weighted sum). Distances are accumulated in float64. The objective is tested every
  ``check_every`` iterations so the device is synchronised only then.
* ``gram`` uses that every iterate after the first is a convex combination :math:`y = X^\top \alpha`
  of the rows. With rows centred at a reference row c, :math:`\tilde X = X - 1 c^\top` and
  :math:`G = \tilde X \tilde X^\top` (n×n, float64 accumulation over column chunks),
  :math:`\lVert x_i - X^\top\alpha\rVert^2 = G_{ii} - 2 (G\alpha)_i + \alpha^\top G \alpha`
  whenever :math:`\sum_j \alpha_j = 1` (clamped at 0 against rounding). The data are read once for G
  and once for the final :math:`X^\top\alpha`; the O(n²) iterations run on the host in float64. The
  reference row is the medoid (least weighted median distance, :func:`fedbgmd.core.gram.medoid`)
  of a column sketch; if the medoid under the full Gram distances is a different row and the
  first centre is far from the bulk (its score more than 10× the medoid's), G is recomputed
  centred at the true medoid, so outliers never cause cancellation in the distances between
  inliers. The gram solver starts on that centre row (α = e_c; ``init`` affects ``direct``
  only): like the medoid, and unlike the weighted mean, it cannot be dragged away by rows
  holding less than half the weight, however far. In the final :math:`X^\top\alpha` the terms
  of far rows (α below 1e-30, subnormal in float32) are summed in float64.

``solver="auto"`` picks ``gram`` when d >= 4 n (measured on CPU and GPU, see docs/core.md).

Example:
    >>> import torch
    >>> from fedbgmd.core import geometric_median
    >>> r = geometric_median(torch.tensor([[0.0], [1.0], [10.0]]))
    >>> round(float(r.median[0]), 4), r.converged
    (1.0, True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedbgmd.core.batched_gm import (
    _vz_lambda,
    _vz_weights,
    combine_rows,
    weiszfeld_coefficients,
)
from fedbgmd.core.coordinatewise import coordinate_median
from fedbgmd.core.gram import robust_centred_gram
from fedbgmd.core.nonfinite import validate_matrix, validate_weights
from fedbgmd.core.norms import row_norms

__all__ = ["GMResult", "geometric_median"]

_SOLVERS = ("auto", "direct", "gram")
_INITS = ("median", "mean")
_DIRECT_FLOAT64_NUMEL = 1 << 24  # direct solver works on a float64 copy up to this size
# above it, a float32 working copy only while no entry reaches this: differences, their squares
# summed over a chunk of columns (row_norms) and the weighted sums then stay finite in float32
_FLOAT32_SAFE_ABS = 1e15


@dataclass(frozen=True)
class GMResult:
    """Result of :func:`geometric_median`.

    Attributes:
        median: (d,) the geometric median estimate, dtype/device of the input.
        iterations: Weiszfeld updates performed.
        converged: True iff the stopping rule was met before ``max_iter``.
        objective: :math:`\\sum_i w_i \\lVert y - x_i \\rVert` at the returned point.
        weights: (n,) final Weiszfeld weights :math:`\\beta_i / \\sum_j \\beta_j` (sum 1); small
            values mark rows that were down-weighted.
        solver: "direct" or "gram".
    """

    median: Tensor
    iterations: int
    converged: bool
    objective: float
    weights: Tensor
    solver: str


def geometric_median(
    x: Tensor,
    weights: Tensor | None = None,
    eps: float = 1e-6,
    max_iter: int = 1000,
    nu: float = 1e-8,
    init: str = "median",
    solver: str = "auto",
    check_every: int = 8,
) -> GMResult:
    """ε-approximate geometric median of the rows of ``x`` (see module docstring for the math).

    Args:
        x: (n, d) float tensor on any device; must be finite (aggregators drop non-finite rows).
        weights: optional (n,) non-negative weights with positive sum.
        eps: relative tolerance ε > 0 on the objective change and on the iterate's move.
        max_iter: maximum number of Weiszfeld updates, >= 1.
        nu: distance floor ν > 0 of the smoothed iteration.
        init: "median" (coordinate-wise median) or "mean" starting point (direct solver).
        solver: "auto", "direct" or "gram".
        check_every: test the stopping rule every this many iterations (direct solver).

    Raises:
        ValueError: on invalid arguments or shapes.
    """
    validate_matrix(x)
    validate_weights(weights, x.shape[0])
    if not eps > 0 or not nu > 0:
        raise ValueError(f"eps and nu must be > 0, got eps={eps}, nu={nu}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter}, {check_every}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    n, d = x.shape
    if solver == "auto":
        solver = "gram" if d >= 4 * n else "direct"
    w = _normalised_weights(weights, n, x.device)
    if n == 1:
        return GMResult(
            x[0].clone(), 0, True, 0.0, torch.ones(1, dtype=x.dtype, device=x.device), solver
        )
    if solver == "gram":
        r = _gram(x, w, eps, max_iter, nu, init, check_every)
    else:
        r = _direct(x, w, eps, max_iter, nu, init, check_every)
    total = float(n) if weights is None else float(weights.sum())
    return dataclasses.replace(r, objective=r.objective * total)


def _normalised_weights(weights: Tensor | None, n: int, device: torch.device) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = weights.to(device=device, dtype=torch.float64)
    return w / w.sum()


def _direct(
    x: Tensor, w: Tensor, eps: float, max_iter: int, nu: float, init: str, check_every: int
) -> GMResult:
    small = x.numel() <= _DIRECT_FLOAT64_NUMEL
    xw = x.to(torch.float64) if small or not _float32_safe(x) else x
    y = coordinate_median(xw) if init == "median" else w.to(xw.dtype) @ xw
    f_prev = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    y_prev, coef, f = y, w, f_prev
    converged = False
    it = 0
    while True:
        dist = row_norms(xw, y)
        f = (w * dist).sum()
        if it == max_iter or (it > 0 and it % check_every == 0):
            step = float(torch.linalg.vector_norm(y - y_prev, dtype=torch.float64))
            if _stop(float(f), float(f_prev), step, float(dist.median()), eps, nu):
                converged = True
                break
            if it == max_iter:
                break
        tc, eta, s = _vz_weights(w, dist, nu)
        t = tc.to(xw.dtype) @ xw  # T(y): the Weiszfeld map over the rows not at y
        lam = _vz_lambda(eta, s, torch.linalg.vector_norm(t - y, dtype=torch.float64))
        coef = (1.0 - lam) * tc + lam * _at_iterate(w, dist, nu)
        y_prev, y = y, (1.0 - lam).to(xw.dtype) * t + lam.to(xw.dtype) * y
        f_prev = f
        it += 1
    return GMResult(y.to(x.dtype), it, converged, float(f), coef.to(x.dtype), "direct")


def _at_iterate(w: Tensor, dist: Tensor, nu: float) -> Tensor:
    """The rows within ν of y, weighted by w and normalised (zeros if there are none)."""
    near = torch.where(dist <= nu, w, torch.zeros_like(w))
    total = near.sum()
    return near / torch.where(total > 0, total, torch.ones_like(total))


def _stop(f: float, f_prev: float, step: float, scale: float, eps: float, nu: float) -> bool:
    """Objective and iterate both settled: |Δf| <= ε f and ||Δy|| <= ε max(median dist, ν)."""
    if f == 0.0:
        return True
    return abs(f_prev - f) <= eps * f and step <= eps * max(scale, nu)


def _gram(
    x: Tensor, w_dev: Tensor, eps: float, max_iter: int, nu: float, init: str, check_every: int
) -> GMResult:
    g, c_idx = robust_centred_gram(x, w_dev)
    if not bool(torch.isfinite(g).all()):
        # finite rows whose products overflow (|x| ~ 1e18 in float32): G is useless, the direct
        # solver's float64 distances are not (the result says solver="direct")
        return _direct(x, w_dev, eps, max_iter, nu, init, check_every)
    w = w_dev.cpu()
    # start on the centre row, not at the weighted mean: the centre is robust (gram.medoid), the
    # mean is not (12 of 25 rows at FLT_MAX left it unconverged after 1,000 iterations)
    alpha0 = torch.zeros_like(w)
    alpha0[c_idx] = 1.0
    # the Gram-space iterations: the batched solver's, for one problem (one implementation)
    a, f_t, it_t, ok_t = weiszfeld_coefficients(
        g[None], w[None], alpha0[None], eps, max_iter, nu, check_every
    )
    alpha, f, it, converged = a[0], float(f_t[0]), int(it_t[0]), bool(ok_t[0])
    if f == 0.0:
        median = x[c_idx].clone()
    else:
        median = combine_rows(alpha, x)
    return GMResult(median, it, converged, f, alpha.to(device=x.device, dtype=x.dtype), "gram")


def _float32_safe(x: Tensor) -> bool:
    return float(x.abs().amax()) < _FLOAT32_SAFE_ABS
