r"""Geometric medians of many problems at once: the Gram solver with a leading run dimension.

A fused sweep (:mod:`fedbgmd.fused`) aggregates R runs per round, each with its own rows
:math:`X_r \in \mathbb{R}^{n \times k}`. :func:`batched_geometric_median` computes for every r the
same smoothed Weiszfeld iterates as ``geometric_median(X_r, solver="gram")``
(:mod:`fedbgmd.core.geometric_median`: Vardi–Zhang step, the stopping rule on the objective *and*
the iterate's move, the last iterate returned) with all runs advancing together:

1. centre: the medoid (least weighted median distance) of a strided column sketch of each run,
   as :func:`fedbgmd.core.gram.robust_centred_gram`; a run whose medoid under the full Gram
   distances differs and whose first centre lies far from the bulk is re-centred, as there; the
   iterations start on the centre row, as the single solver's;
2. :math:`G_r = (X_r - 1c_r^\top)(X_r - 1c_r^\top)^\top` for all runs by batched products over
   column chunks, summed in float64;
3. the iterations run on ``G`` (R×n×n, float64) on the data's device; a run that met the stopping
   rule is frozen (its coefficients and iteration count stop changing) while the others go on, and
   the host reads the "all stopped" flag only every ``check_every`` iterations, not per step.

The float64 arithmetic per run is the single solver's, in batched kernels; results agree with
``geometric_median`` to rounding (tests/core/test_batched_gm.py states the tolerance).
Runs whose Gram matrix is not finite (rows so large that products overflow) are reported in
``gram_ok`` so the caller can fall back to the direct solver for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedbgmd.core.gram import RECENTRE_RATIO, SKETCH_COLUMNS, median_distance_scores

__all__ = [
    "BatchedGMResult",
    "batched_centred_gram",
    "batched_geometric_median",
    "combine_rows",
    "weiszfeld_coefficients",
]

_CHUNK = 1 << 18  # columns per float64 chunk of the batched Gram product
# float32 coefficients below this are subnormal or close to it (~1e-38): x_j α_j of a far row
# (α_j ~ 1 / its distance) would lose its digits; such terms are added in float64
_TINY_COEF = 1e-30


@dataclass(frozen=True)
class BatchedGMResult:
    """Per-run results of :func:`batched_geometric_median` (leading dimension R everywhere).

    Attributes:
        median: (R, k) the estimates, dtype/device of the input.
        coefficients: (R, n) float64 convex weights α with median = αᵀ X (rows far from the
            median get small weights).
        iterations: (R,) int64 Weiszfeld updates per run.
        converged: (R,) bool, the stopping rule was met before ``max_iter``.
        objective: (R,) float64 Σ_i w_i ||median − x_i|| (weights normalised to sum 1).
        gram_ok: (R,) bool, False where G was not finite (the result there is meaningless;
            use the direct solver).
    """

    median: Tensor
    coefficients: Tensor
    iterations: Tensor
    converged: Tensor
    objective: Tensor
    gram_ok: Tensor


def _medoid(dist: Tensor, w: Tensor) -> Tensor:
    """(R,) index of the least weighted median distance (fedbgmd.core.gram.medoid's rule)."""
    return torch.argmin(median_distance_scores(dist, w), dim=1)


def _pairwise(g: Tensor) -> Tensor:
    diag = g.diagonal(dim1=1, dim2=2)
    return (diag[:, :, None] + diag[:, None, :] - 2.0 * g).clamp_min_(0.0).sqrt_()


def batched_centred_gram(x: Tensor, centre: Tensor) -> Tensor:
    """(R, n, n) float64 ``(x_r − c_r)(x_r − c_r)ᵀ`` for x (R, n, k) and centres (R, k)."""
    r, n, k = x.shape
    g = torch.zeros(r, n, n, dtype=torch.float64, device=x.device)
    for s in range(0, k, _CHUNK):
        b = (x[:, :, s : s + _CHUNK] - centre[:, None, s : s + _CHUNK]).to(torch.float64)
        g.baddbmm_(b, b.transpose(1, 2))
    return g


def _robust_gram(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrices centred at a medoid row of each run and those rows' indices (R,);
    fedbgmd.core.gram.robust_centred_gram's rules, run by run."""
    rr = torch.arange(x.shape[0], device=x.device)
    step = max(1, x.shape[2] // SKETCH_COLUMNS)
    xs = x[:, :, ::step].to(torch.float64)
    c_idx = _medoid(torch.cdist(xs, xs), w)
    g = batched_centred_gram(x, x[rr, c_idx])
    finite = torch.isfinite(g).flatten(1).all(dim=1)
    score = median_distance_scores(_pairwise(torch.where(finite[:, None, None], g, 0.0)), w)
    m_idx = torch.argmin(score, dim=1)
    far = score[rr, c_idx].square() > RECENTRE_RATIO * score[rr, m_idx].square()
    redo = finite & (m_idx != c_idx) & far
    if bool(redo.any()):  # rare: the sketch's medoid was far from the bulk
        idx = redo.nonzero().squeeze(1)
        c_idx = torch.where(redo, m_idx, c_idx)
        g[idx] = batched_centred_gram(x[idx], x[idx, c_idx[idx]])
    return g, c_idx


def batched_geometric_median(
    x: Tensor,
    weights: Tensor | None = None,
    eps: float = 1e-6,
    max_iter: int = 1000,
    nu: float = 1e-8,
    check_every: int = 8,
) -> BatchedGMResult:
    """Geometric median of the rows of each ``x[r]`` (see the module docstring).

    Args:
        x: (R, n, k) finite floating tensor (R runs of n rows each).
        weights: optional (R, n) non-negative weights, each run's with a positive sum; a zero
            weight removes a row from that run's problem.
        eps, max_iter, nu: as :func:`fedbgmd.core.geometric_median`.
        check_every: read the "every run stopped" flag on the host every this many iterations.

    Raises:
        ValueError: on a bad shape or argument.
    """
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"expected an (R, n, k) tensor, got shape {tuple(x.shape)}")
    if not eps > 0 or not nu > 0 or max_iter < 1 or check_every < 1:
        raise ValueError("need eps > 0, nu > 0, max_iter >= 1, check_every >= 1")
    runs, n, _ = x.shape
    dev = x.device
    if weights is None:
        w = torch.full((runs, n), 1.0 / n, dtype=torch.float64, device=dev)
    else:
        if weights.shape != (runs, n):
            raise ValueError(f"weights must have shape {(runs, n)}, got {tuple(weights.shape)}")
        w = weights.to(device=dev, dtype=torch.float64)
        w = w / w.sum(dim=1, keepdim=True)
    g, c_idx = _robust_gram(x, w)
    ok = torch.isfinite(g).flatten(1).all(dim=1)
    g = torch.where(ok[:, None, None], g, torch.zeros_like(g))
    rr = torch.arange(runs, device=dev)
    # start on the centre row (robust), as the single solver does
    alpha0 = torch.zeros_like(w)
    alpha0[rr, c_idx] = 1.0
    alpha, f, iters, conv = weiszfeld_coefficients(g, w, alpha0, eps, max_iter, nu, check_every)
    median = torch.bmm(alpha.to(x.dtype).unsqueeze(1), x).squeeze(1)
    tiny = ((alpha > 0) & (alpha < _TINY_COEF)).any(dim=1)
    for r in tiny.nonzero().squeeze(1).tolist():  # far rows' tiny coefficients: float64 terms
        median[r] = combine_rows(alpha[r], x[r])
    at_centre = (f == 0.0).unsqueeze(1)  # every row at one point: the centre row exactly
    median = torch.where(at_centre, x[rr, c_idx], median)
    return BatchedGMResult(median, alpha, iters, conv, f, ok)


def weiszfeld_coefficients(
    g: Tensor, w: Tensor, alpha0: Tensor, eps: float, max_iter: int, nu: float, check_every: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weiszfeld (Vardi–Zhang step) in coefficient space for R problems at once.

    ``g`` (R, n, n) float64 centred Gram matrices, ``w`` (R, n) weights summing to 1, ``alpha0``
    (R, n) starting coefficients summing to 1 (the iterate Xᵀα0). Returns the last iterates α
    (R, n), objectives (R,), iterations (R,) and converged flags (R,). The math is
    :mod:`fedbgmd.core.geometric_median`'s (the single solver calls this with R = 1): each
    iteration computes distances ||x_i − Xᵀα||² = G_ii − 2(Gα)_i + αᵀGα, tests the stopping
    rule (|Δf| <= ε f and ||Δy|| <= ε max(median distance, ν), or f = 0) and takes the Vardi–Zhang
    step. A problem stops (is frozen) at the first iteration whose test passes, or at
    ``max_iter``; the host reads whether all have stopped every ``check_every`` iterations.
    The last iterate is returned, not the argmin of noisy objective values: with far outliers the
    objective's rounding noise exceeds the inliers' progress (an argmin was 0.35 off the median
    for outliers at 1e13, 45 at 1e16, in a 5,000-dimensional test).
    """
    runs = g.shape[0]
    dev = g.device
    diag = g.diagonal(dim1=1, dim2=2)
    alpha = alpha0.clone()
    alpha_prev = alpha.clone()
    f_prev = torch.full((runs,), float("inf"), dtype=torch.float64, device=dev)
    done = torch.zeros(runs, dtype=torch.bool, device=dev)
    conv = torch.zeros(runs, dtype=torch.bool, device=dev)
    iters = torch.zeros(runs, dtype=torch.int64, device=dev)
    f_out = torch.zeros(runs, dtype=torch.float64, device=dev)
    it = 0
    while True:
        ga = torch.bmm(g, alpha.unsqueeze(2)).squeeze(2)
        quad = (alpha * ga).sum(dim=1, keepdim=True)
        dist = (diag - 2.0 * ga + quad).clamp_min_(0.0).sqrt_()
        f = (w * dist).sum(dim=1)
        # the stopping rule (_stop): |Δf| <= ε f and ||Δy|| <= ε max(median dist, ν); f = 0 stops
        step = _g_norm(g, alpha - alpha_prev)
        scale = dist.median(dim=1).values.clamp_min(nu)
        settled = ((f_prev - f).abs() <= eps * f) & (step <= eps * scale)
        stop_now = (f == 0.0) | ((it > 0) & settled)
        newly = stop_now & ~done
        conv |= newly
        f_out = torch.where(done, f_out, f)
        iters = torch.where(done, iters, torch.full_like(iters, it))
        done |= stop_now
        if it == max_iter:
            break
        if it % check_every == 0 and bool(done.all()):
            break
        t, eta, s = _vz_weights(w, dist, nu)
        lam = _vz_lambda(eta, s, _g_norm(g, t - alpha)).unsqueeze(1)
        new = (1.0 - lam) * t + lam * alpha
        keep = done.unsqueeze(1)
        alpha_prev = torch.where(keep, alpha_prev, alpha)
        alpha = torch.where(keep, alpha, new)
        f_prev = torch.where(done, f_prev, f)
        it += 1
    return alpha, f_out, iters, conv


def _vz_weights(w: Tensor, dist: Tensor, nu: float) -> tuple[Tensor, Tensor, Tensor]:
    """Vardi–Zhang split of the rows (over the last dimension; leading ones are problems): (coefficients of T(y), ∝ w_i / d_i over the rows farther
    than ν from y and 0 at the others (all 0 if no row is farther); η = the weight of the rows
    within ν of y; S = Σ w_i / d_i over the farther rows).

    Plain Weiszfeld gives a row at the iterate the weight w/ν: an iterate that starts on a
    non-optimal row (the coordinate-wise median of three points is often one of them) then
    creeps away by ~ν per step, and the stopping rule sees no progress. Vardi & Zhang (PNAS 2000)
    move y to (1 − λ) T(y) + λ y with T the Weiszfeld map over the other rows and
    λ = min(1, η / r), r = ||Σ_i w_i (x_i − y) / d_i|| = S ||T(y) − y||: y stays on the row only
    if it is the median (r <= η) and otherwise leaves it at once. Without such rows η = 0, λ = 0
    and the step is plain Weiszfeld (bit for bit).
    """
    near = dist <= nu
    inv = torch.where(near, torch.zeros_like(dist), w / dist.clamp_min(nu))
    eta = torch.where(near, w, torch.zeros_like(w)).sum(dim=-1)
    s = inv.sum(dim=-1)
    return inv / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1), eta, s


def _vz_lambda(eta: Tensor, s: Tensor, move: Tensor) -> Tensor:
    """λ = min(1, η / (S ||T(y) − y||)); 0 without rows at y; 1 if T(y) = y or every row is at
    y (y is the median)."""
    r = s * move
    inner = torch.where(r > 0, (eta / r).clamp(max=1.0), torch.ones_like(r))
    return torch.where(eta > 0, inner, torch.zeros_like(inner))


def combine_rows(alpha: Tensor, x: Tensor) -> Tensor:
    """Xᵀα in x's dtype; the terms of coefficients below _TINY_COEF are summed in float64."""
    tiny = (alpha > 0) & (alpha < _TINY_COEF)
    if x.dtype == torch.float64 or not bool(tiny.any()):
        return alpha.to(device=x.device, dtype=x.dtype) @ x
    idx = tiny.nonzero().squeeze(1)
    main = torch.where(tiny, torch.zeros_like(alpha), alpha).to(device=x.device, dtype=x.dtype)
    far = alpha[idx].to(x.device) @ x.index_select(0, idx.to(x.device)).to(torch.float64)
    return main @ x + far.to(x.dtype)


def _g_norm(g: Tensor, delta: Tensor) -> Tensor:
    """(R,) ||Xᵀ δ_r|| for coefficient differences δ (R, n) summing to 0."""
    q = (delta * torch.bmm(g, delta.unsqueeze(2)).squeeze(2)).sum(dim=1)
    return q.clamp_min(0.0).sqrt()
