"""Simple update attacks (kind ``"update"``): the Byzantine client replaces its honest flat update.

Notation: ``c ∈ R^d`` is the honest update ``x_t − y_i`` the client computed, ``c̃`` what it sends.

>>> import torch
>>> from fedbgmd.attacks.update import BitFlipAttack
>>> g = torch.Generator().manual_seed(0)
>>> BitFlipAttack(scale=5.0).corrupt_update(torch.tensor([1.0, -2.0]), generator=g)
tensor([-5., 10.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    SampleUpdates,
    UpdateAttack,
    check_choice,
    check_nonnegative,
    check_positive,
    randn_like,
)

__all__ = ["BitFlipAttack", "GaussianAttack", "RandomUpdateAttack", "SignFlipAttack"]


@dataclass(frozen=True)
class BitFlipAttack(UpdateAttack):
    """Bit flip: ``c̃ = −s · c``.

    ``scale`` (s > 0): the slides of FL-BGMD use s = 100 (default); the authors' runs used s = 5.
    Deterministic (the generator is unused). Source: the "bit flip" gradient attack of
    Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD" (2018), as used by the BGMD paper
    (Acharya et al., "Robust Training in High Dimensions via Block Coordinate Geometric Median
    Descent", AISTATS 2022).
    """

    name: ClassVar[str] = "bit_flip"

    scale: float = 100.0

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        return update * (-self.scale)


@dataclass(frozen=True)
class GaussianAttack(UpdateAttack):
    """Additive Gaussian noise: ``c̃ = c + z``, ``z ~ N(0, σ² I_d)``.

    ``sigma`` (σ >= 0): default 10 (variance 100, as in the BGMD paper's experiments).
    """

    name: ClassVar[str] = "gaussian"

    sigma: float = 10.0

    def __post_init__(self) -> None:
        check_nonnegative("sigma", self.sigma)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        return update + self.sigma * randn_like(update, generator)


@dataclass(frozen=True)
class SignFlipAttack(UpdateAttack):
    """Sign flip, two documented modes.

    * ``mode="negate"`` (default): ``c̃ = −c`` — the classic sign-flipping attack (e.g. Li et al.,
      "RSA: Byzantine-robust stochastic aggregation", AAAI 2019). Numerically it is ``bit_flip``
      with s = 1; it has its own name because the literature reports it as a separate attack.
    * ``mode="sign"``: ``c̃ = −sign(c)`` — only the flipped signs are sent (entries in {−1, 0, 1}),
      the sign-SGD flavour of the attack (Bernstein et al., "signSGD with majority vote", 2019).

    Deterministic (the generator is unused).
    """

    name: ClassVar[str] = "sign_flip"
    MODES: ClassVar[tuple[str, ...]] = ("negate", "sign")

    mode: str = "negate"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, self.MODES)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        if self.mode == "sign":
            return -torch.sign(update)
        return -update


@dataclass(frozen=True)
class RandomUpdateAttack(UpdateAttack):
    """Random Gaussian update: ``c̃ = z``, ``z ~ N(0, s² I_d)`` — the honest update is discarded.

    ``scale`` (s > 0): default 1. Source: the "Gaussian attack" of Blanchard et al., "Machine
    learning with adversaries: Byzantine tolerant gradient descent" (Krum, NeurIPS 2017).
    """

    name: ClassVar[str] = "random"

    scale: float = 1.0

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        return self.scale * randn_like(update, generator)
