"""Coordinate-wise order statistics on a stacked (n, d) tensor (vectorised over columns).

``coordinate_median(x)_j`` = median of the column ``x[:, j]``; for even n it is the mean of the
two middle order statistics ``(x_(n/2) + x_(n/2+1)) / 2`` (1-based order statistics).
``trimmed_mean(x, b)_j`` = mean of the order statistics ``x_(b+1), ..., x_(n-b)`` of column j.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["coordinate_median", "trimmed_mean"]


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``x`` (n, d); even n averages the two middle values."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    if n % 2 == 1:
        return torch.kthvalue(x, n // 2 + 1, dim=0).values
    if x.device.type == "cpu":
        # both middle order statistics from one partial sort: the n/2 + 1 largest, descending,
        # end with x_(n/2+1), x_(n/2). Same values as two kthvalue calls, 2.1x faster on the
        # CPU (32 x 1.16M, 1 thread: 1.36 s instead of 2.86 s); CUDA keeps kthvalue (unmeasured).
        top = torch.topk(x, n // 2 + 1, dim=0, sorted=True).values
        return (top[-1] + top[-2]).mul_(0.5)  # a new tensor: `top` is not kept alive
    lo = torch.kthvalue(x, n // 2, dim=0).values
    hi = torch.kthvalue(x, n // 2 + 1, dim=0).values
    return lo.add_(hi).mul_(0.5)


def trimmed_mean(x: Tensor, b: int) -> Tensor:
    """Mean of each column after removing its ``b`` smallest and ``b`` largest entries."""
    n = x.shape[0]
    if not 0 <= 2 * b < n:
        raise ValueError(f"cannot trim {b} from each end of {n} rows")
    if b == 0:
        return x.mean(dim=0)
    xs = torch.sort(x, dim=0).values
    return xs[b : n - b].mean(dim=0)
