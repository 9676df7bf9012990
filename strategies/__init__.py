"""Flower server strategies (Message API): FL-BGMD and every baseline, as config choices and as
drop-ins for Flower's FedAvg in any ServerApp (docs/flower.md).

Importable only as ``fedbgmd.strategies`` (the folder ``strategies/`` is mapped into the package).
"""

from fedbgmd.strategies.fedbgmd import FedBGMD
from fedbgmd.strategies.robust import RobustStrategy

__all__ = ["FedBGMD", "RobustStrategy"]
