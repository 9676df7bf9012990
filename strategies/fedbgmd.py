"""FedBGMD: FL-BGMD (Algorithm 3) as a named strategy — RobustStrategy with the GM block step."""

from __future__ import annotations

from typing import Any

from fedbgmd.core import get_aggregator
from fedbgmd.strategies.robust import RobustStrategy


class FedBGMD(RobustStrategy):
    """P_t = γ_s G_t + M_t, Δ_t = C_k(P_t), M_{t+1} = P_t − Δ_t, x_{t+1} = x_t − GM_ε(Δ_t).

    Defaults: block on, β = 0.1, active norm sampling, per-client memory, GM(ε = 1e-6).
    Any keyword of :class:`RobustStrategy` can be overridden.
    """

    def __init__(self, *, aggregator: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("block", True)
        kwargs.setdefault("beta", 0.1)
        kwargs.setdefault("selector", "sample")
        kwargs.setdefault("memory", "per_client")
        super().__init__(aggregator=aggregator or get_aggregator("gm", eps=1e-6), **kwargs)
