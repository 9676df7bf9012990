r"""Centred Gram matrices and pairwise distances of the rows of a stacked (n, d) tensor.

For rows :math:`x_i` and a reference row c, :math:`G = (X - 1c^\top)(X - 1c^\top)^\top`
(n×n, float64). Squared distances follow as :math:`D_{ij} = G_{ii} + G_{jj} - 2G_{ij}` (clamped at
0). Centring at a row inside the bulk of the data keeps the entries of G of the size of the
distances, so no precision is lost to cancellation when the data share a large common offset or
contain far outliers. The reference row is the medoid of a strided column sketch; if the medoid
under the full distances differs and the first centre is far from the bulk, G is recomputed once.
On CPU the product is taken over column chunks of the input dtype, summed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["centred_gram", "medoid", "pairwise_from_gram", "robust_centred_gram"]

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


def medoid(dist: Tensor, w: Tensor) -> int:
    """Index minimising Σ_j w_j dist_ij over the rows with positive weight (ties: lowest index)."""
    score = dist @ w.to(dist.dtype)
    score = torch.where(w > 0, score, torch.full_like(score, math.inf))
    return int(torch.argmin(score))


def _sketch_medoid(x: Tensor, w: Tensor) -> int:
    step = max(1, x.shape[1] // SKETCH_COLUMNS)
    xs = x[:, ::step].to(torch.float64)
    return medoid(torch.cdist(xs, xs), w)


def robust_centred_gram(x: Tensor, w: Tensor) -> tuple[Tensor, int]:
    """Gram matrix of ``x`` centred at a medoid row, on the host, and that row's index.

    Args:
        x: (n, d) finite floating tensor.
        w: (n,) non-negative weights (used for the medoid).
    """
    c_idx = _sketch_medoid(x, w)
    g = centred_gram(x, x[c_idx]).cpu()
    w_h = w.cpu()
    dist = pairwise_from_gram(g)
    m_idx = medoid(dist, w_h)
    if m_idx != c_idx:
        spread = float(dist[m_idx].median()) ** 2
        if float(g.diagonal().median()) > RECENTRE_RATIO * spread:
            c_idx = m_idx
            g = centred_gram(x, x[c_idx]).cpu()
    return g, c_idx
