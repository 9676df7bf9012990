"""ALIE — "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019).

Every Byzantine client sends, coordinate-wise,

    c̃_j = μ_j − z · σ_j,

where μ, σ are the coordinate-wise mean and (sample) standard deviation of honest updates and
``z`` is the paper's maximal deviation that still lets the malicious update hide among the honest
ones. With n clients of which f are Byzantine, the paper sets

    s = ⌊n / 2 + 1⌋ − f   (honest "supporters" the attacker needs),
    z_max = Φ⁻¹((n − s) / n),

Φ the standard normal CDF (:func:`alie_z`).

Two modes, kept apart in the types:

* :class:`AlieAttack` (client, non-omniscient): μ, σ are estimated from the attacker's *own* data:
  ``m`` extra honest updates from ``sample_updates(m)`` stacked with its own update (m + 1 rows).
* :class:`OmniscientAlie` (server adversary hook, SIMULATION ONLY): μ, σ of the round's honest
  updates; by default ``z`` is computed from n = n_h + num_byzantine and f = num_byzantine.

σ uses the Bessel correction (divisor rows − 1), and is 0 for a single row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    OmniscientAttack,
    SampleUpdates,
    UpdateAttack,
    check_finite,
    check_int,
    coordinate_stats,
    stack_own_samples,
)

__all__ = ["AlieAttack", "OmniscientAlie", "alie_z"]


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """The ALIE deviation ``z_max = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f`` (Baruch et al. 2019).

    Requires n >= 2 and 1 <= f with s >= 1 (i.e. f <= ⌊n/2⌋).

    >>> round(alie_z(50, 24), 4)  # the paper's example: n = 50, f = 24 -> z ≈ 1.75
    1.7507
    """
    check_int("num_clients", num_clients, minimum=2)
    check_int("num_byzantine", num_byzantine, minimum=1)
    s = (num_clients // 2 + 1) - num_byzantine
    if s < 1:
        raise ValueError(
            f"num_byzantine must be <= num_clients // 2 for ALIE's z, got "
            f"num_clients={num_clients}, num_byzantine={num_byzantine}"
        )
    return NormalDist().inv_cdf((num_clients - s) / num_clients)


def _resolve_z(z: float | None, num_clients: int | None, num_byzantine: int | None) -> float:
    if z is not None:
        return z
    if num_clients is not None and num_byzantine is not None:
        return alie_z(num_clients, num_byzantine)
    return 1.0


def _validate(z: float | None, num_clients: int | None, num_byzantine: int | None) -> None:
    if z is not None:
        check_finite("z", z)
    if (num_clients is None) != (num_byzantine is None):
        raise ValueError(
            "num_clients and num_byzantine must be given together (to compute z), got "
            f"num_clients={num_clients!r}, num_byzantine={num_byzantine!r}"
        )
    if num_clients is not None and num_byzantine is not None:
        alie_z(num_clients, num_byzantine)  # validates both


@dataclass(frozen=True)
class AlieAttack(UpdateAttack):
    """Non-omniscient ALIE: ``c̃ = μ − z·σ`` from the attacker's own ``m + 1`` updates.

    Parameters: ``m`` (>= 1, default 8) extra updates requested from ``sample_updates``; ``z``
    explicit deviation, else computed by :func:`alie_z` when ``num_clients`` and ``num_byzantine``
    are given, else 1.0 (see :attr:`z_value`). ``sample_updates`` is required at call time.
    """

    name: ClassVar[str] = "alie"

    m: int = 8
    z: float | None = None
    num_clients: int | None = None
    num_byzantine: int | None = None

    def __post_init__(self) -> None:
        check_int("m", self.m, minimum=1)
        _validate(self.z, self.num_clients, self.num_byzantine)

    @property
    def z_value(self) -> float:
        """The deviation actually used: ``z``, else ``alie_z(num_clients, num_byzantine)``, else 1."""
        return _resolve_z(self.z, self.num_clients, self.num_byzantine)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        rows = stack_own_samples(update, sample_updates, self.m, self.name)
        mu, sigma = coordinate_stats(rows)
        return mu - self.z_value * sigma


@dataclass(frozen=True)
class OmniscientAlie(OmniscientAttack):
    """Omniscient ALIE (SIMULATION ONLY): every malicious row is ``μ − z·σ`` of the honest rows.

    ``z`` explicit, else :func:`alie_z` with ``num_clients`` (default n_h + num_byzantine) and
    f = num_byzantine. A round where the Byzantine rows are a majority (possible when clients are
    sampled per round even with fewer than half Byzantine overall) uses f = ⌊n/2⌋, the largest f
    the formula is defined for (its largest z); f = 0 gives 1.0 (nothing is returned then).
    """

    name: ClassVar[str] = "alie"

    z: float | None = None
    num_clients: int | None = None

    def __post_init__(self) -> None:
        if self.z is not None:
            check_finite("z", self.z)
        if self.num_clients is not None:
            check_int("num_clients", self.num_clients, minimum=2)

    def z_for(self, num_honest: int, num_byzantine: int) -> float:
        """The deviation used for a round with ``num_honest`` honest and ``num_byzantine`` rows."""
        if self.z is not None:
            return self.z
        if num_byzantine == 0:
            return 1.0
        n = self.num_clients if self.num_clients is not None else num_honest + num_byzantine
        return alie_z(n, min(num_byzantine, n // 2))

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        mu, sigma = coordinate_stats(honest)
        row = mu - self.z_for(honest.shape[0], num_byzantine) * sigma
        return row.unsqueeze(0).repeat(num_byzantine, 1)
