"""Aggregator plug-in contract, result type and name registry.

An aggregator maps the stacked client messages ``x`` (n, d) — one row per client, any device,
float32/float64 — and optional non-negative per-row ``weights`` (n,) to one vector (d,) of the same
dtype and device. Aggregators are stateless (everything they need is in their constructor
parameters) except the few with ``stateful = True`` (``cclip(center="previous")`` keeps its last
output as the next centre): their state goes through ``state_dict()`` / ``load_state_dict()``
(saved with the strategy's checkpoint), and :meth:`Aggregator.probe` gives a copy to evaluate
without changing it (an omniscient adversary's trial aggregations).

Contract (tested for every registered aggregator by ``tests/core/test_contract.py``): shape,
dtype, device kept; input not mutated; output not aliased to the input; invariant to permuting
rows; deterministic; n = 1 and identical rows return that row; non-finite policy below.

Non-finite policy: before aggregating, every row containing NaN/±Inf (or with a non-finite
weight) is dropped by :func:`fedbgmd.core.drop_nonfinite_rows` and counted in
``AggregationResult.n_dropped``; if no finite row remains ``AggregationRefused`` (a
``ValueError``) is raised, as when fewer rows remain than the rule needs (``min_rows``). NaN is never
propagated into the result.

Weights: aggregators whose rule has a weighted form (``mean``, ``gm``, ``nc``, ``cclip``,
``multikrum``, ``norm_filter``) use them; the others raise ``ValueError`` when weights are passed (a robust rule that
trusts client-reported sample counts would not be robust), so nothing is silently ignored.

Write your own by subclassing :class:`Aggregator` (implement ``_aggregate``) and calling
``register_aggregator("name", factory)``.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedbgmd.core.errors import AggregationRefused
from fedbgmd.core.nonfinite import drop_nonfinite_rows, validate_weights
from fedbgmd.core.registry import Registry

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "available_aggregators",
    "get_aggregator",
    "register_aggregator",
]


@dataclass(frozen=True)
class AggregationResult:
    """Aggregate plus diagnostics.

    Attributes:
        vector: (d,) aggregate, same dtype/device as the input.
        iterations: iterations of an iterative rule (0 for closed forms).
        converged: False only when an iterative rule stopped at its iteration limit.
        objective: the rule's objective at ``vector`` when it has one (GM: Σ w_i ||v − x_i||).
        weights: per-row weights/scores over the rows *after* non-finite rows were dropped.
        selected: indices (into the rows after dropping) of the rows used (Krum family).
        n_dropped: rows removed by the non-finite policy.
        extra: further scalar diagnostics.
    """

    vector: Tensor
    iterations: int = 0
    converged: bool = True
    objective: float | None = None
    weights: Tensor | None = None
    selected: Tensor | None = None
    n_dropped: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Aggregator(ABC):
    """Base class: validates input, applies the non-finite policy, calls :meth:`_aggregate`.

    Class attributes:
        name: registry name.
        supports_weights: whether ``weights`` are used; if False, passing weights raises.
    """

    name: str = "aggregator"
    supports_weights: bool = False
    stateful: bool = False  # True: the result depends on earlier calls (see state_dict)

    def min_rows(self) -> int:
        """Smallest number of (finite) rows the rule accepts."""
        return 1

    def __call__(self, x: Tensor, weights: Tensor | None = None) -> AggregationResult:
        """Aggregate the rows of ``x`` (n, d); see the module docstring for the contract."""
        if weights is not None and not self.supports_weights:
            raise ValueError(f"aggregator {self.name!r} does not use weights; pass weights=None")
        xf, wf, n_dropped = drop_nonfinite_rows(x, weights)
        validate_weights(wf, xf.shape[0])
        if xf.shape[0] < self.min_rows():
            raise AggregationRefused(
                f"aggregator {self.name!r} needs at least {self.min_rows()} finite rows, "
                f"got {xf.shape[0]} (dropped {n_dropped} non-finite)"
            )
        res = self._aggregate(xf, wf)
        if n_dropped:
            res = dataclasses.replace(res, n_dropped=n_dropped)
        return res

    @abstractmethod
    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        """Aggregate finite rows ``x`` (n, d) with validated ``weights``."""

    def state_dict(self) -> dict[str, Any]:
        """State carried from call to call (empty for a stateless rule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a stateless rule has nothing to restore)."""
        return None

    def probe(self) -> Aggregator:
        """An aggregator to call without side effects: a copy when the rule is stateful."""
        return copy.deepcopy(self) if self.stateful else self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _load_builtins(reg: Registry[Aggregator]) -> None:
    from fedbgmd.core import agg_basic, agg_clipping, agg_gm, agg_krum

    for module in (agg_basic, agg_gm, agg_krum, agg_clipping):
        for name, factory in module.BUILTINS.items():
            reg._add(name, factory)
    # the trim fraction of ctm / norm_filter was called beta, the block fraction's name
    reg.rename_param("ctm", "beta", "trim")
    reg.rename_param("norm_filter", "beta", "trim")


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", _load_builtins)


def register_aggregator(
    name: str, factory: Callable[..., Aggregator], *, replace: bool = False
) -> None:
    """Register ``factory(**params) -> Aggregator`` under ``name`` (a taken name raises
    ValueError unless ``replace=True``)."""
    AGGREGATORS.register(name, factory, replace=replace)


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """Build the aggregator ``name``; unknown name -> ValueError, unknown parameter -> TypeError."""
    return AGGREGATORS.build(name, **params)


def available_aggregators() -> list[str]:
    """Sorted names of all registered aggregators."""
    return AGGREGATORS.names()
