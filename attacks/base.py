"""The two attack contracts, kept apart in the types, plus shared validation and RNG helpers.

* :class:`ClientAttack` runs *inside* a Byzantine client. It sees only that client's data and its
  own honest update. Three kinds:

  - ``"update"``: the client computes its honest flat update ``c = x_t − y_i`` (shape ``(d,)``) and
    sends ``corrupt_update(c)`` instead;
  - ``"data"``: the client trains honestly on ``corrupt_batch(x, y)`` instead of ``(x, y)``;
  - ``"message"``: the outgoing named arrays (state-dict shaped) are replaced by
    ``corrupt_arrays(arrays)`` — wrong shapes, dtypes, keys, absurd sizes.

* :class:`OmniscientAttack` runs in the server's adversary hook before aggregation — **simulation
  only**: it sees the honest updates of the round, ``honest`` of shape ``(n_h, d)``, and returns
  ``num_byzantine`` malicious rows of shape ``(num_byzantine, d)``. The rows then meet the checks
  every reply meets (finiteness, ``max_update_norm``). In block mode (FL-BGMD) the hook still
  works in full dimension: ALIE / IPM statistics, min-max / min-sum distances and the
  ``aggregator`` it is offered are those of the whole ``d``-vectors, not of the k coordinates
  the server then selects and aggregates (the block is chosen after the rows are written).

Shared contract of every attack (tested by one parametrised suite in ``tests/test_attacks.py``):

* inputs are never mutated and outputs never alias inputs;
* shape, dtype and device are kept (update attacks, data attacks, omniscient rows);
* all randomness comes from the ``generator`` argument (no global RNG): the same seed gives the
  same output. Noise is drawn on the generator's device and then moved to the tensor's device, so
  a CPU generator gives the same numbers whatever device the tensors live on;
* parameters are validated at construction; a bad value raises :class:`ValueError` naming it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ATTACK_KINDS",
    "ClientAttack",
    "OmniscientAttack",
    "SampleUpdates",
    "call_corrupt_update",
]

ATTACK_KINDS: tuple[str, ...] = ("update", "data", "message")

SampleUpdates = Callable[[int], Tensor]
"""``sample_updates(m)`` -> ``(m, d)`` extra honest updates computed by the attacker on its own data."""


class ClientAttack:
    """Base class of the attacks that run inside a Byzantine client.

    Subclasses set the class variables ``name`` (registry name) and ``kind`` (one of
    ``"update"``, ``"data"``, ``"message"``) and override the one hook of their kind; the other
    two hooks are the identity. Parameters are dataclass fields validated in ``__post_init__``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def corrupt_batch(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        """Return the (possibly) corrupted training batch; data attacks override. Never mutates."""
        return x, y

    def corrupt_update(
        self,
        update: Tensor,
        *,
        generator: torch.Generator,
        sample_updates: SampleUpdates | None = None,
        lr: float | None = None,
    ) -> Tensor:
        """Return the update to send instead of the honest flat ``update`` of shape ``(d,)``.

        ``sample_updates(m)`` returns ``(m, d)`` extra honest updates the attacker computed on its
        own data (non-omniscient ALIE / IPM use them to estimate statistics). ``lr`` is the
        round's client learning rate (``gaussian`` with ``on="gradient"`` needs it). Never mutates.
        The clients call it through :func:`call_corrupt_update`, which passes ``lr`` only to an
        override that accepts it (a user attack written before ``lr`` existed keeps working).
        """
        return update

    def corrupt_arrays(
        self,
        arrays: dict[str, np.ndarray],
        *,
        generator: np.random.Generator | torch.Generator,
    ) -> dict[str, np.ndarray]:
        """Return the outgoing named arrays to send; message attacks override. Never mutates."""
        return arrays


class UpdateAttack(ClientAttack):
    """Base of the update attacks: ``corrupt_update`` validates the flat honest update once and
    calls :meth:`corrupt`, the one method a subclass writes (it must not mutate ``update``)."""

    kind: ClassVar[str] = "update"

    def corrupt_update(
        self,
        update: Tensor,
        *,
        generator: torch.Generator,
        sample_updates: SampleUpdates | None = None,
        lr: float | None = None,
    ) -> Tensor:
        check_flat_update(update)
        corrupt: Callable[..., Tensor] = self.corrupt  # a subclass's may take lr
        if lr is not None and _accepts_lr(corrupt):  # the rule call_corrupt_update applies
            return corrupt(update, generator, sample_updates, lr=lr)
        return corrupt(update, generator, sample_updates)

    def corrupt(
        self, update: Tensor, generator: torch.Generator, sample_updates: SampleUpdates | None
    ) -> Tensor:
        """The corrupted update for the honest flat ``update`` (d,). A subclass that needs the
        round's client learning rate adds a keyword ``lr`` (``None`` when the caller has none)."""
        raise NotImplementedError


class OmniscientAttack:
    """Base class of the server-side adversaries (SIMULATION ONLY: they see the honest updates).

    ``attack(honest, num_byzantine, generator=g, aggregator=agg)`` maps the ``(n_h, d)`` honest
    updates of the round to ``(num_byzantine, d)`` malicious rows (same dtype and device).
    ``aggregator`` (stacked ``(n, d)`` -> ``(d,)``) is offered to aggregator-aware attacks; in
    block mode it is the configured aggregator applied in full dimension, not the block step.
    ``__call__`` validates the inputs once (:func:`check_honest`) and calls :meth:`craft`, the one
    method a subclass writes (it must not mutate ``honest``).
    """

    name: ClassVar[str] = ""

    def __call__(
        self,
        honest: Tensor,
        num_byzantine: int,
        *,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        check_honest(honest, num_byzantine)
        return self.craft(honest, num_byzantine, generator, aggregator)

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        """The ``(num_byzantine, d)`` malicious rows for the validated ``honest`` rows (n_h, d)."""
        raise NotImplementedError


def call_corrupt_update(
    attack: ClientAttack,
    update: Tensor,
    *,
    generator: torch.Generator,
    sample_updates: SampleUpdates | None,
    lr: float,
) -> Tensor:
    """``attack.corrupt_update(update, ...)`` with the round's client learning rate ``lr`` passed
    when the method takes it (a keyword ``lr`` or ``**kwargs``): the one call of the clients
    (fedbgmd.clients.honest) and of the fused engine (fedbgmd.fused), so both pass the same."""
    kwargs: dict[str, Any] = {"generator": generator, "sample_updates": sample_updates}
    if _accepts_lr(attack.corrupt_update):
        kwargs["lr"] = lr
    return attack.corrupt_update(update, **kwargs)


def _accepts_lr(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "lr" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


# ----------------------------------------------------------------------------------------------
# Validation helpers (ValueError naming the parameter).


def check_finite(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is finite and > 0."""
    check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is finite and >= 0."""
    check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` lies in (0, 1] (or [0, 1] with ``allow_zero``)."""
    check_finite(name, value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_int(name: str, value: int, *, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# RNG helpers: draw on the generator's device, then move to the target tensor's device/dtype.


def _float_dtype(like: Tensor) -> torch.dtype:
    return like.dtype if like.dtype.is_floating_point else torch.get_default_dtype()


def randn_like(
    like: Tensor, generator: torch.Generator, shape: Sequence[int] | None = None
) -> Tensor:
    """Standard normal noise with ``like``'s (float) dtype and device, drawn from ``generator``."""
    size = tuple(like.shape) if shape is None else tuple(shape)
    dtype = _float_dtype(like)
    z = torch.randn(size, generator=generator, device=generator.device, dtype=dtype)
    return z.to(like.device)


def rand_like(
    like: Tensor, generator: torch.Generator, shape: Sequence[int] | None = None
) -> Tensor:
    """Uniform [0, 1) numbers with ``like``'s (float) dtype and device, drawn from ``generator``."""
    size = tuple(like.shape) if shape is None else tuple(shape)
    dtype = _float_dtype(like)
    u = torch.rand(size, generator=generator, device=generator.device, dtype=dtype)
    return u.to(like.device)


def randperm(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random permutation of ``range(n)`` drawn from ``generator``, moved to ``device``."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def check_flat_update(update: Tensor) -> None:
    """Raise ValueError unless ``update`` is a 1-D floating tensor (the flat update contract)."""
    if update.dim() != 1 or not update.dtype.is_floating_point:
        raise ValueError(
            f"update must be a flat (d,) floating tensor, got shape {tuple(update.shape)} "
            f"and dtype {update.dtype}"
        )


def check_honest(honest: Tensor, num_byzantine: int) -> None:
    """Validate the omniscient-attack inputs: ``honest`` (n_h >= 1, d) float, ``num_byzantine`` >= 0."""
    if honest.dim() != 2 or honest.shape[0] < 1 or not honest.dtype.is_floating_point:
        raise ValueError(
            f"honest must be a (n_h >= 1, d) floating tensor, got shape {tuple(honest.shape)} "
            f"and dtype {honest.dtype}"
        )
    check_int("num_byzantine", num_byzantine, minimum=0)


def coordinate_stats(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinate-wise mean μ and standard deviation σ of ``rows`` (n, d).

    σ is the sample standard deviation (Bessel correction, divisor n − 1) for n >= 2 and 0 for
    n = 1 (one observation carries no spread information).
    """
    mu = rows.mean(dim=0)
    if rows.shape[0] < 2:
        return mu, torch.zeros_like(mu)
    return mu, rows.std(dim=0, correction=1)


def stack_own_samples(
    update: Tensor, sample_updates: SampleUpdates | None, m: int, attack: str
) -> Tensor:
    """Stack ``sample_updates(m)`` (m, d) under the attacker's own update: ``(m + 1, d)``."""
    if sample_updates is None:
        raise ValueError(
            f"the non-omniscient {attack!r} attack needs sample_updates (extra honest updates "
            "computed on the attacker's own data); use the omniscient variant otherwise"
        )
    extra = sample_updates(m)
    if extra.dim() != 2 or extra.shape[1] != update.shape[0]:
        raise ValueError(
            f"sample_updates({m}) must return an (m, {update.shape[0]}) tensor, "
            f"got shape {tuple(extra.shape)}"
        )
    extra = extra.to(device=update.device, dtype=update.dtype)
    return torch.cat([update.unsqueeze(0), extra], dim=0)
