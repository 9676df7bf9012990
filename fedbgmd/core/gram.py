r"""Centred Gram matrices and pairwise distances of the rows of a stacked (n, d) tensor.

For rows :math:`x_i` and a reference row c, :math:`G = (X - 1c^\top)(X - 1c^\top)^\top`
(n×n, float64). Squared distances follow as :math:`D_{ij} = G_{ii} + G_{jj} - 2G_{ij}` (clamped at
0). Centring at a row inside the bulk of the data keeps the entries of G of the size of the
distances, so no precision is lost to cancellation when the data share a large common offset or
contain far outliers. The reference row is the medoid of a strided column sketch; if the medoid
under the full distances differs and the first centre is far from the bulk, G is recomputed once.
On CPU the product is taken over column chunks of the input dtype, summed in float64.

"Medoid" here is the row whose *weighted median* distance to the rows is least, not the row with
the least sum of distances: a sum is dominated by the farthest rows, and with two finite extremes
(1e20 and FLT_MAX) every row's sum was ~1e40, the honest rows' differences fell below float64
resolution and the tie went to a Byzantine row. A row's weighted median distance is the radius of
the smallest ball around it that holds half the weight. While the rows of one group hold more
than half the weight, each of their scores is at most the group's diameter, and a row that beats
them has a row of the group within that diameter. Only the order of the distances and one of
them enter a score, so rows at any finite distance cannot swamp it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "centred_gram",
    "median_distance_scores",
    "medoid",
    "pairwise_from_gram",
    "robust_centred_gram",
]

SKETCH_COLUMNS = 1024
RECENTRE_RATIO = 100.0


def centred_gram(x: Tensor, c: Tensor) -> Tensor:
    """``(x - c)(x - c)ᵀ`` in float64 on ``x.device``, accumulated over column chunks."""
    n, d = x.shape
    chunk = 4096 if x.device.type == "cpu" else 1 << 22
    if x.dtype == torch.float64 or d <= chunk:
        xc = (x - c).to(torch.float64)
        return xc @ xc.T
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for s in range(0, d, chunk):
        b = x[:, s : s + chunk] - c[s : s + chunk]
        g += (b @ b.T).to(torch.float64)
    return g


def pairwise_from_gram(g: Tensor) -> Tensor:
    """Pairwise Euclidean distances (n, n) from a (centred) Gram matrix."""
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min_(0.0).sqrt_()


def median_distance_scores(dist: Tensor, w: Tensor) -> Tensor:
    """Each row's weighted median distance to the rows: the least r with
    Σ_{j: dist_ij <= r} w_j >= Σ_j w_j / 2 (the row itself counts, at distance 0); +inf for rows
    of zero weight, which cannot be a centre. Leading batch dimensions are allowed
    (``dist`` (..., n, n), ``w`` (..., n)): the batched GM solver scores many runs at once."""
    wd = w.to(device=dist.device, dtype=dist.dtype)
    d_sorted, order = torch.sort(dist, dim=-1)
    cum = wd.unsqueeze(-2).expand_as(dist).gather(-1, order).cumsum(dim=-1)
    # equal weights summing to exactly half count
    half = 0.5 * wd.sum(dim=-1, keepdim=True).unsqueeze(-1) * (1.0 - 1e-12)
    k = (cum < half).sum(dim=-1).clamp_max_(dist.shape[-1] - 1)
    score = d_sorted.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    return torch.where(wd > 0, score, torch.full_like(score, math.inf))


def medoid(dist: Tensor, w: Tensor) -> int:
    """Index of the least :func:`median_distance_scores` (ties: lowest index); see the module
    docstring for why not the least sum of distances."""
    return int(torch.argmin(median_distance_scores(dist, w)))


def _sketch_medoid(x: Tensor, w: Tensor) -> int:
    step = max(1, x.shape[1] // SKETCH_COLUMNS)
    xs = x[:, ::step].to(torch.float64)
    return medoid(torch.cdist(xs, xs), w)


def robust_centred_gram(x: Tensor, w: Tensor) -> tuple[Tensor, int]:
    """Gram matrix of ``x`` centred at a medoid row, on the host, and that row's index.

    The first centre is the medoid of a column sketch. If the medoid under the full Gram
    distances is another row and the first centre is far from the bulk (its score more than
    √RECENTRE_RATIO times the medoid's: an outlier that differs from the rest only in columns
    the sketch missed), G is recomputed centred at the medoid. A G that is not finite (float32
    products of finite rows beyond ~1e18 overflow) is returned as it is, for the caller to see.

    Args:
        x: (n, d) finite floating tensor.
        w: (n,) non-negative weights (used for the medoid).
    """
    c_idx = _sketch_medoid(x, w)
    g = centred_gram(x, x[c_idx]).cpu()
    if not bool(torch.isfinite(g).all()):
        return g, c_idx
    score = median_distance_scores(pairwise_from_gram(g), w.cpu())
    m_idx = int(torch.argmin(score))
    if m_idx != c_idx and float(score[c_idx]) ** 2 > RECENTRE_RATIO * float(score[m_idx]) ** 2:
        c_idx = m_idx
        g = centred_gram(x, x[c_idx]).cpu()
    return g, c_idx
