"""Non-finite update attack (kind ``"update"``, registry name ``"nonfinite"``).

A share ``coord_fraction`` ρ of the coordinates of the honest update ``c`` is replaced by non-finite values:
``k = ⌈ρ · d⌉`` coordinates chosen uniformly without replacement by the generator,

* ``mode="nan"``: ``c̃_j = NaN``;
* ``mode="inf"``: ``c̃_j = ±Inf`` (sign drawn per coordinate);
* ``mode="mixed"``: each chosen coordinate is NaN, +Inf or −Inf with probability 1/3 each.

The other coordinates keep their honest values. SPEC §4: the server must reject or neutralise such
messages with a logged reason, never crash or poison the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    SampleUpdates,
    UpdateAttack,
    check_choice,
    check_fraction,
    rand_like,
    randperm,
)
from fedbgmd.core.counts import fraction_ceil

__all__ = ["NonFiniteAttack"]


@dataclass(frozen=True)
class NonFiniteAttack(UpdateAttack):
    """Replace ``⌈coord_fraction · d⌉`` random coordinates by NaN / ±Inf (see the module docstring).

    ``coord_fraction`` ρ ∈ (0, 1], default 1.0 (every coordinate); ``mode`` ∈ {"nan", "inf", "mixed"}.
    """

    name: ClassVar[str] = "nonfinite"
    MODES: ClassVar[tuple[str, ...]] = ("nan", "inf", "mixed")

    coord_fraction: float = 1.0  # share of coordinates (attack.fraction: of clients)
    mode: str = "nan"

    def __post_init__(self) -> None:
        check_fraction("coord_fraction", self.coord_fraction)
        check_choice("mode", self.mode, self.MODES)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        d = update.numel()
        k = min(d, fraction_ceil(self.coord_fraction, d))
        idx = randperm(d, generator, update.device)[:k]
        u = rand_like(update, generator, shape=(k,))
        nan = torch.full_like(u, math.nan)
        inf = torch.where(u < 0.5, math.inf, -math.inf).to(u.dtype)
        if self.mode == "nan":
            values = nan
        elif self.mode == "inf":
            values = inf
        else:  # mixed: [0, 1/3) NaN, [1/3, 2/3) −Inf, [2/3, 1) +Inf
            values = torch.where(u < 1 / 3, nan, torch.where(u < 2 / 3, -math.inf, math.inf))
            values = values.to(u.dtype)
        out = update.clone()
        out[idx] = values
        return out
