"""FedBGMD: FL-BGMD (Algorithm 3) as a named strategy — RobustStrategy with the GM block step.

A thin subclass, the way Flower's FedMedian sits on FedAvg: only its defaults differ (block on,
β = 0.1, active norm sampling, per-client memory, GM(ε = 1e-6)). The ``fedbgmd`` preset targets it,
and ``FedBGMD()`` replaces ``FedAvg()`` in any Flower ServerApp (docs/flower.md).
"""

from __future__ import annotations

from typing import Any

from fedbgmd.core import Aggregator, get_aggregator
from fedbgmd.strategies.robust import RobustStrategy


class FedBGMD(RobustStrategy):
    """P_t = γ_s G_t + M_t, Δ_t = C_k(P_t), M_{t+1} = P_t − Δ_t, x_{t+1} = x_t − GM_ε(Δ_t).

    Any keyword of :class:`RobustStrategy` can be given; these are the defaults that differ.
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator | None = None,
        block: bool = True,
        beta: float = 0.1,
        selector: str = "sample",
        memory: str = "per_client",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            aggregator=aggregator or get_aggregator("gm", eps=1e-6, max_iter=1000),
            block=block,
            beta=beta,
            selector=selector,
            memory=memory,
            **kwargs,
        )
