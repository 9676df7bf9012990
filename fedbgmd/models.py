"""Model zoo by short name (pure torch; no flwr, no hydra).

Why: the experiments name their model in config; a registry builds it from the data set's
``num_classes`` and ``input_shape`` so no size is hard-coded.

Models:

* ``cnn`` — the seed's "LeNet" as the authors ran it: conv 5×5 (64) → maxpool 2 → ReLU →
  conv 5×5 (64) → maxpool 2 → ReLU → FC 1024 → ReLU → dropout 0.5 → FC classes. Unpadded
  convolutions: on ``1×28×28`` the map shrinks 28 → 24 → 12 → 8 → 4, so FC1 sees
  ``64·4·4 = 1024`` features and the model has exactly 1,163,978 parameters. Needs inputs of at
  least 16×16.
* ``resnet18`` — the CIFAR variant (3×3 stem conv, stride 1, no max-pool; He et al. 2016 as in
  kuangliu/pytorch-cifar): 11,173,962 parameters for 10 classes. Uses BatchNorm.
* ``mlp`` — flatten → (Linear → ReLU)* → Linear; ``hidden`` sizes configurable (default ``(200,)``).
* ``logreg`` — flatten → Linear (multinomial logistic regression), for fast tests.

``cnn``, ``mlp`` and ``logreg`` have no BatchNorm and no in-place ops on their inputs, so they work
with ``torch.func.functional_call`` + ``vmap`` (per-client gradients in one kernel).

Example::

    >>> m = build_model("cnn", 10, (1, 28, 28), seed=0)
    >>> count_parameters(m)
    1163978
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "CifarResNet18",
    "LeNet",
    "LogReg",
    "build_model",
    "count_parameters",
]


class LeNet(nn.Module):
    """The authors' "LeNet" CNN (1,163,978 parameters on Fashion-MNIST / MNIST).

    Why: Table 2 / Table 3 of the seed were produced with this exact network.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], dropout: float = 0.5) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs a C×H×W input shape, got {tuple(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"cnn needs inputs of at least 16×16, got {h}×{w}")
        self.conv1 = nn.Conv2d(c, 64, kernel_size=5)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=5)
        self.fc1 = nn.Linear(64 * fh * fw, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


class MLP(nn.Module):
    """Fully connected network on flattened inputs.

    Why: a cheap non-linear model for any input shape.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (200,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = [math.prod(input_shape), *(int(h) for h in hidden)]
        if any(s < 1 for s in sizes):
            raise ValueError(f"mlp: input and hidden sizes must be >= 1, got {sizes}")
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.net(x)


class LogReg(nn.Module):
    """Multinomial logistic regression (flatten → linear).

    Why: the fastest model that still learns, for unit and equivalence tests.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.linear(torch.flatten(x, 1))


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers plus an (optionally projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (3×3 stem, no max-pool): 11,173,962 parameters for 10 classes.

    Why: the seed's CIFAR-10 rows (Table 2 bottom) use it.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet18 needs a C×H×W input shape, got {tuple(input_shape)}")
        self.conv1 = nn.Conv2d(int(input_shape[0]), 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": LeNet,
    "resnet18": CifarResNet18,
    "mlp": MLP,
    "logreg": LogReg,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) for ``num_classes`` and ``input_shape``.

    Why: one place maps config names to modules; unknown names fail loudly.

    Args:
        seed: if given, parameters are initialised from this seed inside a forked RNG (global
            RNG state is left untouched), so every caller gets the same initial model.
        options: model-specific keywords, e.g. ``hidden=(256, 128)`` for ``mlp``,
            ``dropout=0.5`` for ``cnn`` / ``mlp``.

    Raises:
        ValueError: unknown name, bad ``num_classes`` / shape, or an option the model lacks.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)}")
    if seed is None:
        return _construct(name, num_classes, shape, options)
    with torch.random.fork_rng(devices=[]):  # modules are built on the CPU
        torch.default_generator.manual_seed(seed)
        return _construct(name, num_classes, shape, options)


def _construct(
    name: str, num_classes: int, shape: tuple[int, ...], options: dict[str, Any]
) -> nn.Module:
    """Call the registered constructor, turning unknown keywords into a ValueError."""
    try:
        return _REGISTRY[name](num_classes, shape, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"model {name!r} does not accept options {sorted(options)}") from err
        raise


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (``d`` in the paper); BatchNorm running stats excluded.

    Why: the block size ``k = ceil(β·d)`` and the communication cost depend on it.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
