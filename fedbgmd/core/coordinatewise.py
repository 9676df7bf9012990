"""Coordinate-wise order statistics on a stacked (n, d) tensor (vectorised over columns).

``coordinate_median(x)_j`` = median of the column ``x[:, j]``; for even n it is the mean of the
two middle order statistics ``(x_(n/2) + x_(n/2+1)) / 2`` (1-based order statistics).
``trimmed_mean(x, b)_j`` = mean of the order statistics ``x_(b+1), ..., x_(n-b)`` of column j.

Both are overflow-safe for finite input: the median's midpoint is ``lo/2 + hi/2`` (halving is
exact, so it equals the rounded ``(lo + hi)/2`` wherever that does not overflow; two values near
FLT_MAX summed to inf in float32), and the trimmed mean accumulates in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedbgmd.core.errors import AggregationRefused

__all__ = ["coordinate_median", "trimmed_mean"]


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``x`` (n, d); even n averages the two middle values."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _median_cpu(x)
    if n % 2 == 1:
        return torch.kthvalue(x, n // 2 + 1, dim=0).values
    lo = torch.kthvalue(x, n // 2, dim=0).values
    hi = torch.kthvalue(x, n // 2 + 1, dim=0).values
    return lo.mul_(0.5).add_(hi, alpha=0.5)


def _median_cpu(x: Tensor) -> Tensor:
    # One introselect per column (numpy's partition) instead of torch's kthvalue/topk, which sort
    # far more than they must on the CPU: 32 x 1.16M float32, 1 thread, 1.9 s -> 0.3 s (odd n:
    # 1.7 s -> 0.2 s), the same values. After partitioning at k = n // 2, row k holds x_(k+1) and
    # rows < k hold the k smallest, so for even n the lower middle value is their maximum.
    k = x.shape[0] // 2
    p = np.partition(x.detach().numpy(), k, axis=0)
    if x.shape[0] % 2 == 1:
        return torch.from_numpy(p[k].copy())  # a copy: a view would keep all of `p` alive
    lo = p[:k].max(axis=0)
    lo *= 0.5
    lo += p[k] * 0.5
    return torch.from_numpy(lo)


def trimmed_mean(x: Tensor, b: int) -> Tensor:
    """Mean of each column after removing its ``b`` smallest and ``b`` largest entries."""
    n = x.shape[0]
    if not 0 <= 2 * b < n:
        raise AggregationRefused(f"cannot trim {b} from each end of {n} rows")
    if b == 0:
        return x.mean(dim=0, dtype=torch.float64).to(x.dtype)
    xs = torch.sort(x, dim=0).values
    return xs[b : n - b].mean(dim=0, dtype=torch.float64).to(x.dtype)
