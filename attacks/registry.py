"""Name registries of the client attacks and of the omniscient (server-side) attacks.

Two separate registries, because the two kinds of attack are kept apart in the types:

* ``ATTACKS``: name -> :class:`~fedbgmd.attacks.base.ClientAttack` subclass;
* ``OMNISCIENT_ATTACKS``: name -> :class:`~fedbgmd.attacks.base.OmniscientAttack` subclass.

Registering a taken name raises; looking up an unknown name raises a ValueError listing the valid
names; an unknown parameter raises a ValueError naming it and listing the valid ones. Built-ins are
registered by the idempotent :func:`register_builtin_attacks`, called by the look-up functions (not
an import side effect).

>>> from fedbgmd.attacks import get_attack
>>> get_attack("bit_flip", scale=5.0)
BitFlipAttack(scale=5.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fedbgmd.attacks.base import ATTACK_KINDS, ClientAttack, OmniscientAttack

__all__ = [
    "ATTACKS",
    "OMNISCIENT_ATTACKS",
    "available_attacks",
    "available_omniscient_attacks",
    "get_attack",
    "get_omniscient_attack",
    "register_attack",
    "register_builtin_attacks",
    "register_omniscient_attack",
]

ATTACKS: dict[str, type[ClientAttack]] = {}
OMNISCIENT_ATTACKS: dict[str, type[OmniscientAttack]] = {}

_T = TypeVar("_T")


def _register(registry: dict[str, Any], name: str, cls: type, base: type, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} {name!r} must be a subclass of {base.__name__}, got {cls!r}")
    if name in registry:
        raise ValueError(f"{what} {name!r} is already registered (by {registry[name].__name__})")
    registry[name] = cls


def register_attack(name: str, cls: type[ClientAttack]) -> None:
    """Register a client attack class under ``name``; a taken name raises ValueError."""
    if getattr(cls, "kind", None) not in ATTACK_KINDS:
        raise ValueError(
            f"attack {name!r} must set kind to one of {list(ATTACK_KINDS)}, "
            f"got {getattr(cls, 'kind', None)!r}"
        )
    _register(ATTACKS, name, cls, ClientAttack, "attack")


def register_omniscient_attack(name: str, cls: type[OmniscientAttack]) -> None:
    """Register an omniscient attack class under ``name``; a taken name raises ValueError."""
    _register(OMNISCIENT_ATTACKS, name, cls, OmniscientAttack, "omniscient attack")


def register_builtin_attacks() -> None:
    """Register every built-in attack (idempotent: a second call changes nothing)."""
    from fedbgmd.attacks.alie import AlieAttack, OmniscientAlie
    from fedbgmd.attacks.features import FeatureNoiseAttack, ImpulseNoiseAttack
    from fedbgmd.attacks.ipm import IpmAttack, OmniscientIpm
    from fedbgmd.attacks.labels import BackdoorAttack, LabelFlipAttack
    from fedbgmd.attacks.malformed import MalformedAttack
    from fedbgmd.attacks.minmax import OmniscientAgrTailored, OmniscientMinMax, OmniscientMinSum
    from fedbgmd.attacks.nonfinite import NonFiniteAttack
    from fedbgmd.attacks.update import (
        BitFlipAttack,
        GaussianAttack,
        RandomUpdateAttack,
        SignFlipAttack,
    )

    client: tuple[type[ClientAttack], ...] = (
        BitFlipAttack,
        GaussianAttack,
        SignFlipAttack,
        RandomUpdateAttack,
        AlieAttack,
        IpmAttack,
        NonFiniteAttack,
        MalformedAttack,
        FeatureNoiseAttack,
        ImpulseNoiseAttack,
        BackdoorAttack,
        LabelFlipAttack,
    )
    omniscient: tuple[type[OmniscientAttack], ...] = (
        OmniscientAlie,
        OmniscientIpm,
        OmniscientMinMax,
        OmniscientMinSum,
        OmniscientAgrTailored,
    )
    for cls in client:
        if ATTACKS.get(cls.name) is not cls:
            register_attack(cls.name, cls)
    for ocls in omniscient:
        if OMNISCIENT_ATTACKS.get(ocls.name) is not ocls:
            register_omniscient_attack(ocls.name, ocls)


def _build(registry: dict[str, type[_T]], name: str, params: dict[str, Any], what: str) -> _T:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(registry)}")
    cls = registry[name]
    if dataclasses.is_dataclass(cls):
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {what} {name!r}; valid: {sorted(valid)}"
            )
    return cls(**params)


def get_attack(name: str, **params: Any) -> ClientAttack:
    """Build the client attack registered as ``name`` with ``params``.

    Unknown name or parameter -> ValueError listing the valid ones; a bad value -> ValueError
    naming the parameter (from the attack's own validation).
    """
    register_builtin_attacks()
    return _build(ATTACKS, name, params, "attack")


def get_omniscient_attack(name: str, **params: Any) -> OmniscientAttack:
    """Build the omniscient attack registered as ``name`` with ``params`` (errors as above)."""
    register_builtin_attacks()
    return _build(OMNISCIENT_ATTACKS, name, params, "omniscient attack")


def available_attacks() -> list[str]:
    """Sorted names of the registered client attacks."""
    register_builtin_attacks()
    return sorted(ATTACKS)


def available_omniscient_attacks() -> list[str]:
    """Sorted names of the registered omniscient attacks."""
    register_builtin_attacks()
    return sorted(OMNISCIENT_ATTACKS)
