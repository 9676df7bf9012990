r"""Closed-form baselines: ``mean``, ``cm`` (coordinate-wise median), ``ctm`` (trimmed mean).

Notation: rows :math:`x_1..x_n \in \mathbb{R}^d` (finite rows only, see the non-finite policy in
:mod:`fedbgmd.core.aggregation`), weights :math:`w_i \ge 0`.

* ``mean`` — FedAvg (McMahan et al., AISTATS 2017): :math:`v = \sum_i w_i x_i / \sum_i w_i`
  (plain average without weights). Not robust: one row can move it arbitrarily.
* ``cm`` — coordinate-wise median (Yin et al., ICML 2018): :math:`v_j = \mathrm{med}(x_{1j}..x_{nj})`;
  for even n the mean of the two middle order statistics. Unweighted.
* ``ctm`` — coordinate-wise trimmed mean (Yin et al., ICML 2018), parameter ``trim`` t ∈ [0, 0.5):
  with :math:`b = \lfloor t n \rfloor` and the sorted column :math:`x_{(1)j} \le .. \le x_{(n)j}`,
  :math:`v_j = \frac{1}{n - 2b} \sum_{r=b+1}^{n-b} x_{(r)j}`. Unweighted.

Example:
    >>> import torch
    >>> from fedbgmd.core import get_aggregator
    >>> get_aggregator("cm")(torch.tensor([[0.0], [1.0], [9.0]])).vector
    tensor([1.])
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.coordinatewise import coordinate_median, trimmed_mean
from fedbgmd.core.counts import fraction_floor
from fedbgmd.core.norms import weighted_row_mean

__all__ = ["CoordinateMedian", "Mean", "TrimmedMean"]


class Mean(Aggregator):
    """(Weighted) average of the rows (FedAvg)."""

    name = "mean"
    supports_weights = True

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        if weights is None:
            return AggregationResult(weighted_row_mean(x))
        w = (weights / weights.sum()).to(device=x.device, dtype=x.dtype)
        return AggregationResult(weighted_row_mean(x, weights), weights=w)


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (even n: mean of the two middle values)."""

    name = "cm"

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        return AggregationResult(coordinate_median(x))


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean.

    Args:
        trim: fraction cut from each end of every column, 0 <= trim < 0.5; ``floor(trim * n)``
            values are removed on each side (was ``beta``, the block fraction's name).
    """

    name = "ctm"

    def __init__(self, trim: float = 0.1) -> None:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"ctm: trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        b = fraction_floor(self.trim, x.shape[0])
        return AggregationResult(trimmed_mean(x, b), extra={"trimmed_per_side": float(b)})


BUILTINS: dict[str, Callable[..., Aggregator]] = {
    "mean": Mean,
    "cm": CoordinateMedian,
    "ctm": TrimmedMean,
}
