r"""Clipping rules: ``nc`` (norm clipping) and ``cclip`` (centered clipping).

:math:`\mathrm{clip}(z, \tau) = z \cdot \min(1, \tau / \lVert z \rVert_2)`; norms are accumulated in
float64; :math:`\bar w_i = w_i / \sum_j w_j` (uniform without weights).

* ``nc`` — norm clipping (Sun et al., "Can you really backdoor FL?", 2019):
  :math:`v = \sum_i \bar w_i\, \mathrm{clip}(x_i, \tau)`. ``tau=None`` uses the median of the row
  norms (an adaptive threshold), so honest rows of similar norm pass unchanged.
* ``cclip`` — centered clipping (Karimireddy, He & Jaggi, ICML 2021):
  :math:`v \leftarrow v + \sum_i \bar w_i\, \mathrm{clip}(x_i - v, \tau)`, repeated ``iterations``
  times, starting from ``center`` (e.g. the previous round's aggregate, passed in explicitly since
  aggregators are stateless) or, when ``center`` is None, from the coordinate-wise median.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.coordinatewise import coordinate_median
from fedbgmd.core.nonfinite import all_finite
from fedbgmd.core.norms import row_norms

__all__ = ["CenteredClipping", "NormClipping", "clip_factors"]


def clip_factors(z: Tensor, tau: float | Tensor) -> Tensor:
    """Per-row factors ``min(1, tau / ||z_i||)`` (float64, 1 for zero rows)."""
    norms = row_norms(z)
    return torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))


def _bar_w(weights: Tensor | None, n: int, device: torch.device) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = weights.to(device=device, dtype=torch.float64)
    return w / w.sum()


class NormClipping(Aggregator):
    """Clip every row to norm ``tau``, then take the (weighted) mean.

    Args:
        tau: clipping radius > 0; None = median of the row norms.
    """

    name = "nc"
    supports_weights = True

    def __init__(self, tau: float | None = None) -> None:
        if tau is not None and not tau > 0:
            raise ValueError(f"nc: tau must be > 0 or None, got {tau}")
        self.tau = tau

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        norms = row_norms(x)
        tau = float(torch.quantile(norms, 0.5)) if self.tau is None else self.tau
        fac = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
        coef = fac * _bar_w(weights, x.shape[0], x.device)
        return AggregationResult(coef.to(x.dtype) @ x, weights=fac.to(x.dtype), extra={"tau": tau})


class CenteredClipping(Aggregator):
    """Centered clipping.

    Args:
        tau: clipping radius > 0.
        iterations: number of clipping steps l >= 1.
        center: (d,) starting point (e.g. previous aggregate); None = coordinate-wise median.
    """

    name = "cclip"
    supports_weights = True

    def __init__(self, tau: float = 1.0, iterations: int = 3, center: Tensor | None = None) -> None:
        if not tau > 0 or iterations < 1:
            raise ValueError(f"cclip: need tau > 0 and iterations >= 1, got {tau}, {iterations}")
        if center is not None and (center.ndim != 1 or not all_finite(center)):
            raise ValueError("cclip: center must be a finite 1-D tensor")
        self.tau, self.iterations, self.center = float(tau), int(iterations), center

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        if self.center is not None:
            if self.center.shape[0] != x.shape[1]:
                raise ValueError(
                    f"cclip: center has {self.center.shape[0]} entries, d={x.shape[1]}"
                )
            v = self.center.to(device=x.device, dtype=x.dtype).clone()
        else:
            v = coordinate_median(x)
        w = _bar_w(weights, x.shape[0], x.device)
        fac = torch.ones_like(w)
        for _ in range(self.iterations):
            z = x - v
            fac = clip_factors(z, self.tau)
            v = v + (fac * w).to(x.dtype) @ z
        return AggregationResult(v, iterations=self.iterations, weights=fac.to(x.dtype))


BUILTINS: dict[str, Callable[..., Aggregator]] = {
    "nc": NormClipping,
    "cclip": CenteredClipping,
}
