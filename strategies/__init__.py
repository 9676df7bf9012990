"""Flower server strategies (Message API): FL-BGMD and every baseline, as config choices.

Importable only as ``fedbgmd.strategies`` (the folder ``strategies/`` is mapped into the package).
"""

from fedbgmd.strategies.fedbgmd import FedBGMD
from fedbgmd.strategies.robust import RobustStrategy

__all__ = ["FedBGMD", "RobustStrategy"]
