"""Feature attacks (kind ``"data"``): the Byzantine client trains honestly on corrupted inputs.

Notation: a batch ``x`` of inputs (any shape, e.g. (B, C, H, W) images, floating dtype) and labels
``y``; ``x̃`` is what the client trains on. Labels are returned unchanged (as a copy).

>>> import torch
>>> from fedbgmd.attacks.features import FeatureNoiseAttack
>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.zeros(2, 1, 4, 4), torch.tensor([3, 7])
>>> xt, yt = FeatureNoiseAttack().corrupt_batch(x, y, generator=g, num_classes=10)
>>> bool((xt - 100).abs().max() < 10), yt.tolist()
(True, [3, 7])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    ClientAttack,
    check_finite,
    check_fraction,
    check_nonnegative,
    rand_like,
    randn_like,
)

__all__ = ["FeatureNoiseAttack", "ImpulseNoiseAttack"]


def _check_batch(x: Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")


@dataclass(frozen=True)
class FeatureNoiseAttack(ClientAttack):
    """Additive Gaussian feature noise: ``x̃ = x + z``, ``z ~ N(mean, std²)`` i.i.d. per element.

    ``mean`` (default 100) and ``std`` (>= 0, default 1): the FL-BGMD slides' N(100, 1).
    """

    name: ClassVar[str] = "feature_noise"
    kind: ClassVar[str] = "data"

    mean: float = 100.0
    std: float = 1.0

    def __post_init__(self) -> None:
        check_finite("mean", self.mean)
        check_nonnegative("std", self.std)

    def corrupt_batch(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        _check_batch(x)
        return x + (self.mean + self.std * randn_like(x, generator)), y.clone()


@dataclass(frozen=True)
class ImpulseNoiseAttack(ClientAttack):
    """Salt-and-pepper (impulse) noise on a fraction ``p`` of the input elements.

    Each element is hit independently with probability p (default 0.9; the authors' runs used
    0.95); a hit element becomes ``high`` ("salt") or ``low`` ("pepper") with probability 1/2 each:

        x̃_j = high  if u_j < p/2,   low  if p/2 <= u_j < p,   x_j  otherwise,   u_j ~ U[0, 1).

    ``low`` / ``high`` default to the batch's min / max (``None``); set them for fixed values
    (e.g. 0 and 1 for unnormalised images). When both are given, ``low <= high`` is required.
    """

    name: ClassVar[str] = "impulse"
    kind: ClassVar[str] = "data"

    p: float = 0.9
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        check_fraction("p", self.p, allow_zero=True)
        if self.low is not None:
            check_finite("low", self.low)
        if self.high is not None:
            check_finite("high", self.high)
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")

    def corrupt_batch(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        _check_batch(x)
        if x.numel() == 0:
            return x.clone(), y.clone()
        low = x.min() if self.low is None else torch.tensor(self.low, dtype=x.dtype)
        high = x.max() if self.high is None else torch.tensor(self.high, dtype=x.dtype)
        u = rand_like(x, generator)
        out = torch.where(u < self.p, low.to(x.device), x)
        out = torch.where(u < self.p / 2, high.to(x.device), out)
        return out, y.clone()
