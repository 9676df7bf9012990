"""IPM — Inner-Product Manipulation (Xie, Koyejo, Gupta, "Fall of Empires", UAI 2020).

Every Byzantine client sends

    c̃ = −ε · μ,

μ the mean of honest updates, ε > 0 (default 0.1: small ε keeps the malicious update close to
the honest cloud while making the inner product ⟨aggregate, μ⟩ negative once enough rows agree).

* :class:`IpmAttack` (client, non-omniscient): μ is the mean of the attacker's own update and
  ``m`` extra honest updates from ``sample_updates(m)``.
* :class:`OmniscientIpm` (server adversary hook, SIMULATION ONLY): μ is the mean of the round's
  honest updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    OmniscientAttack,
    SampleUpdates,
    UpdateAttack,
    check_int,
    check_positive,
    stack_own_samples,
)

__all__ = ["IpmAttack", "OmniscientIpm"]


@dataclass(frozen=True)
class IpmAttack(UpdateAttack):
    """Non-omniscient IPM: ``c̃ = −ε · mean(own update, sample_updates(m))``.

    ``epsilon`` ε > 0 (default 0.1); ``m`` >= 1 extra updates (default 8).
    """

    name: ClassVar[str] = "ipm"

    epsilon: float = 0.1
    m: int = 8

    def __post_init__(self) -> None:
        check_positive("epsilon", self.epsilon)
        check_int("m", self.m, minimum=1)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        rows = stack_own_samples(update, sample_updates, self.m, self.name)
        return rows.mean(dim=0) * (-self.epsilon)


@dataclass(frozen=True)
class OmniscientIpm(OmniscientAttack):
    """Omniscient IPM (SIMULATION ONLY): every malicious row is ``−ε · mean(honest)``."""

    name: ClassVar[str] = "ipm"

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        check_positive("epsilon", self.epsilon)

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        row = honest.mean(dim=0) * (-self.epsilon)
        return row.unsqueeze(0).repeat(num_byzantine, 1)
