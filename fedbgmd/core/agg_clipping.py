r"""Norm-based rules: ``norm_filter`` (the seed's NC_β), ``nc`` (norm clipping) and ``cclip``
(centred clipping).

:math:`\mathrm{clip}(z, \tau) = z \cdot \min(1, \tau / \lVert z \rVert_2)`; norms are accumulated in
float64; :math:`\bar w_i = w_i / \sum_j w_j` (uniform without weights).

* ``norm_filter`` — NC_β, the filtering rule of the seed's Table 1 (Ghosh et al. 2019; Gupta et
  al. 2020), parameter ``trim`` t: drop the :math:`b = \lfloor t n \rfloor` rows of largest norm (the decimal floor
  of :func:`fedbgmd.core.fraction_floor`, as for the Byzantine count; ties: the later rows go)
  and take the (weighted) mean of the other n − b.
* ``nc`` — norm clipping (Sun et al., "Can you really backdoor FL?", 2019):
  :math:`v = \sum_i \bar w_i\, \mathrm{clip}(x_i, \tau)`. The default ``tau=None`` is relative:
  the median of the round's row norms, so the radius follows the scale of the updates (an
  absolute τ = 1 on lr-scaled updates of norm ≈ 0.05 clipped nothing: a plain mean). A number
  sets an absolute radius.
* ``cclip`` — centred clipping (Karimireddy, He & Jaggi, ICML 2021):
  :math:`v \leftarrow v + \sum_i \bar w_i\, \mathrm{clip}(x_i - v, \tau)`, repeated ``iterations``
  times from a centre :math:`v_0`: ``center="previous"`` is the paper's rule (and ByzFL's): the
  previous call's output, zero at the first call — a stateful aggregator whose state is saved
  with the strategy's checkpoint. ``center="median"`` (the default, stateless) starts from the
  coordinate-wise median of the round; a tensor is a fixed centre.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.coordinatewise import coordinate_median
from fedbgmd.core.counts import fraction_floor
from fedbgmd.core.nonfinite import all_finite
from fedbgmd.core.norms import row_norms, weighted_row_mean

__all__ = ["CenteredClipping", "NormClipping", "NormFilter", "clip_factors"]


def clip_factors(z: Tensor, tau: float | Tensor) -> Tensor:
    """Per-row factors ``min(1, tau / ||z_i||)`` (float64, 1 for zero rows)."""
    norms = row_norms(z)
    return torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))


def _bar_w(weights: Tensor | None, n: int, device: torch.device) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = weights.to(device=device, dtype=torch.float64)
    return w / w.sum()


class NormFilter(Aggregator):
    """NC_β: drop the ⌊trim·n⌋ rows of largest norm, average the rest.

    Args:
        trim: fraction of rows dropped, 0 <= trim < 1 (at least one row always stays; was
            ``beta``, the block fraction's name).
    """

    name = "norm_filter"
    supports_weights = True

    def __init__(self, trim: float = 0.1) -> None:
        if not 0.0 <= trim < 1.0:
            raise ValueError(f"norm_filter: trim must be in [0, 1), got {trim}")
        self.trim = float(trim)

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        n = x.shape[0]
        b = fraction_floor(self.trim, n)
        norms = row_norms(x)
        keep = torch.sort(torch.sort(norms, stable=True).indices[: n - b]).values
        coef = torch.zeros(n, dtype=torch.float64, device=x.device)
        coef[keep] = 1.0 if weights is None else weights.to(x.device, torch.float64)[keep]
        if not float(coef.sum()) > 0:
            raise ValueError("norm_filter: the rows kept have zero total weight")
        return AggregationResult(
            weighted_row_mean(x, coef),
            weights=norms.to(x.dtype),
            selected=keep,
            extra={"dropped": float(b)},
        )


class NormClipping(Aggregator):
    """Clip every row to norm ``tau``, then take the (weighted) mean.

    Args:
        tau: clipping radius > 0; None (default) = the median of the round's row norms.
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


_CENTERS = ("median", "previous")


class CenteredClipping(Aggregator):
    """Centred clipping.

    Args:
        tau: clipping radius > 0.
        iterations: number of clipping steps l >= 1.
        center: ``"previous"`` (the paper: the last output, zero at first; stateful),
            ``"median"`` or None (the round's coordinate-wise median; stateless) or a finite
            (d,) tensor (a fixed centre).
    """

    name = "cclip"
    supports_weights = True

    def __init__(
        self, tau: float = 1.0, iterations: int = 3, center: Tensor | str | None = None
    ) -> None:
        if not tau > 0 or iterations < 1:
            raise ValueError(f"cclip: need tau > 0 and iterations >= 1, got {tau}, {iterations}")
        if isinstance(center, str):
            if center not in _CENTERS:
                raise ValueError(f"cclip: center must be one of {_CENTERS} or a tensor")
        elif center is not None and (center.ndim != 1 or not all_finite(center)):
            raise ValueError("cclip: center must be a finite 1-D tensor")
        self.tau, self.iterations, self.center = float(tau), int(iterations), center
        self.stateful = isinstance(center, str) and center == "previous"
        self._previous: Tensor | None = None  # the last output (center="previous")

    def _start(self, x: Tensor) -> Tensor:
        d = x.shape[1]
        if isinstance(self.center, Tensor) or self.stateful:
            c = self.center if isinstance(self.center, Tensor) else self._previous
            if c is None:  # the paper's first round: v_0 = 0
                return torch.zeros(d, dtype=x.dtype, device=x.device)
            if c.shape[0] != d:
                raise ValueError(f"cclip: center has {c.shape[0]} entries, d={d}")
            return c.to(device=x.device, dtype=x.dtype).clone()
        return coordinate_median(x)

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        v = self._start(x)
        w = _bar_w(weights, x.shape[0], x.device)
        fac = torch.ones_like(w)
        for _ in range(self.iterations):
            z = x - v
            fac = clip_factors(z, self.tau)
            v = v + (fac * w).to(x.dtype) @ z
        if self.stateful:
            self._previous = v.detach().clone()
        return AggregationResult(v, iterations=self.iterations, weights=fac.to(x.dtype))

    def state_dict(self) -> dict[str, Any]:
        if not self.stateful:
            return {}
        return {"previous": None if self._previous is None else self._previous.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stateful and "previous" in state:
            prev = state["previous"]
            self._previous = None if prev is None else prev.clone()

    def __repr__(self) -> str:
        return (
            f"CenteredClipping(tau={self.tau!r}, iterations={self.iterations!r}, "
            f"center={self.center!r})"
        )


BUILTINS: dict[str, Callable[..., Aggregator]] = {
    "norm_filter": NormFilter,
    "nc": NormClipping,
    "cclip": CenteredClipping,
}
