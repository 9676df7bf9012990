"""Row norms and row means of a stacked (n, d) tensor, accurate and single-pass.

* ``row_norms(x, y)`` = :math:`\\lVert x_i - y \\rVert_2` (y optional) in float64. float64 inputs are
  reduced directly; lower precision inputs are reduced over column chunks (float32 partial sums
  short enough to stay accurate) accumulated in float64 — a single float32 reduction over 10⁶
  columns is off by ~1e-5 on CPU, and casting the whole matrix to float64 costs a full extra pass
  and memory.
* ``weighted_row_mean(x, w)`` = :math:`\\sum_i w_i x_i / \\sum_i w_i` (uniform when w is None) as one
  matrix-vector product, which is several times faster on CPU than a dim-0 reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["row_norms", "weighted_row_mean"]

_CPU_CHUNK = 8192
_GPU_CHUNK = 1 << 22


def row_norms(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean norms of the rows of ``x - y`` (float64, shape (n,))."""
    if x.dtype == torch.float64:
        exact: Tensor = torch.linalg.vector_norm(x if y is None else x - y, dim=1)
        return exact
    chunk = _CPU_CHUNK if x.device.type == "cpu" else _GPU_CHUNK
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        block = x[:, start : start + chunk]
        if y is not None:
            block = block - y[start : start + chunk]
        acc += torch.linalg.vector_norm(block, dim=1).to(torch.float64).square_()
    return acc.sqrt_()


def weighted_row_mean(x: Tensor, w: Tensor | None = None) -> Tensor:
    """(Weighted) mean of the rows of ``x`` in ``x``'s dtype; ``w`` (n,) non-negative."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    if w is None:
        coef = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
    else:
        w64 = w.to(device=x.device, dtype=torch.float64)
        coef = (w64 / w64.sum()).to(x.dtype)
    return coef @ x
