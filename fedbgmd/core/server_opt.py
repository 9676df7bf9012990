r"""ServerOptimizer: the server's step from the aggregated direction, x_{t+1} = x_t − u_t.

``lr`` is γ_s, the server step size. Where it applies is the aggregation's business: the plain
rule takes :math:`u_t = \gamma_s \mathrm{Agg}(G_t)`, the block step puts it inside
:math:`P_t = \gamma_s G_t + M_t` (Algorithm 3); this object then steps along :math:`u_t`, plainly or
with heavy-ball / Nesterov momentum (:math:`b_t = \mu b_{t-1} + u_t`, step :math:`b_t`, or
:math:`u_t + \mu b_t` with Nesterov). Stateful: the momentum buffer is in :meth:`state_dict`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["ServerOptimizer"]


class ServerOptimizer:
    """γ_s and the optional momentum of the server step (see the module docstring)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"server step size must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.buffer: Tensor | None = None  # b_t, created on the first momentum step

    def step(self, x: Tensor, direction: Tensor) -> Tensor:
        """x − u (or the momentum step on u); a new tensor, ``x`` is not modified."""
        if self.momentum == 0.0:
            return x - direction
        buf = self.buffer
        buf = direction.clone() if buf is None else self.momentum * buf + direction
        self.buffer = buf
        step = direction + self.momentum * buf if self.nesterov else buf
        return x - step

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": None if self.buffer is None else self.buffer.cpu()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        buf = state.get("momentum")
        self.buffer = None if buf is None else buf.to(device)
