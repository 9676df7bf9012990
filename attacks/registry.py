"""Name registries of the client attacks and of the omniscient (server-side) attacks.

Two separate registries, because the two kinds of attack are kept apart in the types:

* ``ATTACKS``: name -> :class:`~fedbgmd.attacks.base.ClientAttack` subclass;
* ``OMNISCIENT_ATTACKS``: name -> :class:`~fedbgmd.attacks.base.OmniscientAttack` subclass.

Both are :class:`fedbgmd.core.Registry` objects, with its rules: an unknown name raises a
ValueError listing the valid names, an unknown parameter a TypeError naming it, a taken name a
ValueError (unless ``replace=True``). Built-ins are registered by the registries' loader on first
use (not an import side effect).

>>> from fedbgmd.attacks import get_attack
>>> get_attack("bit_flip", scale=5.0)
BitFlipAttack(scale=5.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedbgmd.attacks.base import ATTACK_KINDS, ClientAttack, OmniscientAttack
from fedbgmd.core.registry import Registry

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


def _subclass_of(base: type, what: str) -> Callable[[str, Any], None]:
    def check(name: str, cls: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(f"{what} {name!r} must be a subclass of {base.__name__}, got {cls!r}")
        if base is ClientAttack and getattr(cls, "kind", None) not in ATTACK_KINDS:
            raise ValueError(
                f"attack {name!r} must set kind to one of {list(ATTACK_KINDS)}, "
                f"got {getattr(cls, 'kind', None)!r}"
            )

    return check


def _load_client(reg: Registry[ClientAttack]) -> None:
    from fedbgmd.attacks.alie import AlieAttack
    from fedbgmd.attacks.features import FeatureNoiseAttack, ImpulseNoiseAttack
    from fedbgmd.attacks.ipm import IpmAttack
    from fedbgmd.attacks.labels import BackdoorAttack, LabelFlipAttack
    from fedbgmd.attacks.malformed import MalformedAttack
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
    for cls in client:
        reg._add(cls.name, cls)
    # one name per concept: the non-finite attack was registered as "nan", and its share of
    # coordinates was "fraction" (the Byzantine share's name, attack.fraction)
    reg.rename("nan", NonFiniteAttack.name)
    reg.rename_param(NonFiniteAttack.name, "fraction", "coord_fraction")


def _load_omniscient(reg: Registry[OmniscientAttack]) -> None:
    from fedbgmd.attacks.alie import OmniscientAlie
    from fedbgmd.attacks.ipm import OmniscientIpm
    from fedbgmd.attacks.minmax import OmniscientAgrTailored, OmniscientMinMax, OmniscientMinSum

    omniscient: tuple[type[OmniscientAttack], ...] = (
        OmniscientAlie,
        OmniscientIpm,
        OmniscientMinMax,
        OmniscientMinSum,
        OmniscientAgrTailored,
    )
    for cls in omniscient:
        reg._add(cls.name, cls)


ATTACKS: Registry[ClientAttack] = Registry(
    "attack", _load_client, check=_subclass_of(ClientAttack, "attack")
)
OMNISCIENT_ATTACKS: Registry[OmniscientAttack] = Registry(
    "omniscient attack", _load_omniscient, check=_subclass_of(OmniscientAttack, "omniscient attack")
)


def register_attack(name: str, cls: type[ClientAttack], *, replace: bool = False) -> None:
    """Register a client attack class under ``name``; a taken name raises ValueError unless
    ``replace=True``."""
    ATTACKS.register(name, cls, replace=replace)


def register_omniscient_attack(
    name: str, cls: type[OmniscientAttack], *, replace: bool = False
) -> None:
    """Register an omniscient attack class under ``name`` (duplicates as above)."""
    OMNISCIENT_ATTACKS.register(name, cls, replace=replace)


def register_builtin_attacks() -> None:
    """Register every built-in attack (idempotent; the look-ups do it on first use)."""
    ATTACKS.names()
    OMNISCIENT_ATTACKS.names()


def get_attack(name: str, **params: Any) -> ClientAttack:
    """Build the client attack registered as ``name`` with ``params``.

    Unknown name -> ValueError listing the valid ones; unknown parameter -> TypeError naming it;
    a bad value -> ValueError naming the parameter (from the attack's own validation).
    """
    return ATTACKS.build(name, **params)


def get_omniscient_attack(name: str, **params: Any) -> OmniscientAttack:
    """Build the omniscient attack registered as ``name`` with ``params`` (errors as above)."""
    return OMNISCIENT_ATTACKS.build(name, **params)


def available_attacks() -> list[str]:
    """Sorted names of the registered client attacks."""
    return ATTACKS.names()


def available_omniscient_attacks() -> list[str]:
    """Sorted names of the registered omniscient attacks."""
    return OMNISCIENT_ATTACKS.names()
