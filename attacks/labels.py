"""Label attacks (kind ``"data"``): the Byzantine client trains honestly on corrupted labels.

Labels ``y`` are integer class indices in ``{0, …, C − 1}`` (C = ``num_classes``); the returned
labels keep ``y``'s dtype, shape and device. Inputs are returned as a copy unless a trigger is set.

>>> import torch
>>> from fedbgmd.attacks.labels import LabelFlipAttack
>>> g = torch.Generator().manual_seed(0)
>>> LabelFlipAttack().corrupt_batch(torch.zeros(3, 2), torch.tensor([0, 4, 9]),
...                                 generator=g, num_classes=10)[1].tolist()
[9, 5, 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import ClientAttack, check_finite, check_int

__all__ = ["BackdoorAttack", "LabelFlipAttack"]


def _check_labels(y: Tensor, num_classes: int) -> None:
    check_int("num_classes", num_classes, minimum=1)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer label tensor, got dtype {y.dtype}")


@dataclass(frozen=True)
class BackdoorAttack(ClientAttack):
    """Backdoor: every label of the corrupted client is set to ``target`` (default 0):
    ``ỹ_b = target`` for all b.

    The FL-BGMD slides do not name the class; the authors' runs ended up using class 0.
    Optional trigger (off by default, ``trigger=True``): a ``trigger_size`` × ``trigger_size``
    square in the bottom-right corner of the last two input dimensions is set to
    ``trigger_value`` (default: the batch maximum), BadNets-style (Gu et al., 2017).
    """

    name: ClassVar[str] = "backdoor"
    kind: ClassVar[str] = "data"

    target: int = 0
    trigger: bool = False
    trigger_size: int = 3
    trigger_value: float | None = None

    def __post_init__(self) -> None:
        check_int("target", self.target, minimum=0)
        if not isinstance(self.trigger, bool):
            raise ValueError(f"trigger must be a bool, got {self.trigger!r}")
        check_int("trigger_size", self.trigger_size, minimum=1)
        if self.trigger_value is not None:
            check_finite("trigger_value", self.trigger_value)

    def corrupt_batch(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        _check_labels(y, num_classes)
        if self.target >= num_classes:
            raise ValueError(f"target must be < num_classes={num_classes}, got {self.target}")
        x_out = x.clone()
        if self.trigger:
            if x.dim() < 2 or min(x.shape[-2:]) < self.trigger_size:
                raise ValueError(
                    f"trigger_size={self.trigger_size} does not fit inputs of shape {tuple(x.shape)}"
                )
            value = x.max() if self.trigger_value is None else self.trigger_value
            x_out[..., -self.trigger_size :, -self.trigger_size :] = value
        return x_out, torch.full_like(y, self.target)


@dataclass(frozen=True)
class LabelFlipAttack(ClientAttack):
    """Label flip: ``ỹ = C − 1 − y`` (class c becomes class C − 1 − c). No parameters."""

    name: ClassVar[str] = "label_flip"
    kind: ClassVar[str] = "data"

    def corrupt_batch(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        _check_labels(y, num_classes)
        return x.clone(), (num_classes - 1) - y
