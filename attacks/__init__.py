"""fedbgmd.attacks (folder `attacks/`, importable only as `fedbgmd.attacks`).

Byzantine attacks, pure torch (no flwr, no hydra). Two kinds, kept apart in the types
(see :mod:`fedbgmd.attacks.base`):

* client attacks (:class:`ClientAttack`, registry ``ATTACKS``), run inside a Byzantine client:
  update attacks ``bit_flip``, ``gaussian``, ``sign_flip``, ``random``, ``alie``, ``ipm``,
  ``nonfinite``; message attack ``malformed``; data attacks ``feature_noise``, ``impulse``,
  ``backdoor``, ``label_flip``;
* omniscient attacks (:class:`OmniscientAttack`, registry ``OMNISCIENT_ATTACKS``), run in the
  server's adversary hook — SIMULATION ONLY: ``alie``, ``ipm``, ``minmax``, ``minsum``, ``agr_tailored``.

>>> import torch
>>> from fedbgmd.attacks import get_attack
>>> attack = get_attack("gaussian", sigma=10.0)
>>> g = torch.Generator().manual_seed(0)
>>> attack.corrupt_update(torch.zeros(4), generator=g).shape
torch.Size([4])
"""

from fedbgmd.attacks.alie import AlieAttack, OmniscientAlie, alie_z
from fedbgmd.attacks.base import (
    ATTACK_KINDS,
    ClientAttack,
    OmniscientAttack,
    SampleUpdates,
    UpdateAttack,
)
from fedbgmd.attacks.features import FeatureNoiseAttack, ImpulseNoiseAttack
from fedbgmd.attacks.ipm import IpmAttack, OmniscientIpm
from fedbgmd.attacks.labels import BackdoorAttack, LabelFlipAttack
from fedbgmd.attacks.malformed import MALFORMED_MODES, MalformedAttack
from fedbgmd.attacks.minmax import OmniscientAgrTailored, OmniscientMinMax, OmniscientMinSum
from fedbgmd.attacks.nonfinite import NonFiniteAttack
from fedbgmd.attacks.registry import (
    ATTACKS,
    OMNISCIENT_ATTACKS,
    available_attacks,
    available_omniscient_attacks,
    get_attack,
    get_omniscient_attack,
    register_attack,
    register_builtin_attacks,
    register_omniscient_attack,
)
from fedbgmd.attacks.update import BitFlipAttack, GaussianAttack, RandomUpdateAttack, SignFlipAttack

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "MALFORMED_MODES",
    "OMNISCIENT_ATTACKS",
    "AlieAttack",
    "BackdoorAttack",
    "BitFlipAttack",
    "ClientAttack",
    "FeatureNoiseAttack",
    "GaussianAttack",
    "ImpulseNoiseAttack",
    "IpmAttack",
    "LabelFlipAttack",
    "MalformedAttack",
    "NonFiniteAttack",
    "OmniscientAgrTailored",
    "OmniscientAlie",
    "OmniscientAttack",
    "OmniscientIpm",
    "OmniscientMinMax",
    "OmniscientMinSum",
    "RandomUpdateAttack",
    "SampleUpdates",
    "SignFlipAttack",
    "UpdateAttack",
    "alie_z",
    "available_attacks",
    "available_omniscient_attacks",
    "get_attack",
    "get_omniscient_attack",
    "register_attack",
    "register_builtin_attacks",
    "register_omniscient_attack",
]
