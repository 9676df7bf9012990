r"""``gm`` — geometric median aggregator (GMD / RFA; Pillutla et al. 2022, Acharya et al. 2022).

:math:`v = \arg\min_y \sum_i w_i \lVert y - x_i \rVert_2` (weights :math:`w_i \ge 0`, default 1),
computed to relative tolerance ε by :func:`fedbgmd.core.geometric_median` (smoothed Weiszfeld;
see that module for the math and the ``direct``/``gram`` solvers). Breakdown point 1/2.
``weights`` holds the final Weiszfeld weights (rows far from the median get small weights);
``converged`` and ``iterations`` report the oracle's stopping state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.geometric_median import geometric_median

__all__ = ["GeometricMedian"]


class GeometricMedian(Aggregator):
    """Geometric median of the rows.

    Args:
        eps: relative tolerance ε > 0 (objective change and iterate move).
        max_iter: maximum Weiszfeld updates.
        nu: distance floor ν > 0.
        init: "median" or "mean" (direct solver start).
        solver: "auto", "direct" or "gram".
        check_every: stopping-rule test period (direct solver).
    """

    name = "gm"
    supports_weights = True

    def __init__(
        self,
        eps: float = 1e-6,
        max_iter: int = 1000,
        nu: float = 1e-8,
        init: str = "median",
        solver: str = "auto",
        check_every: int = 8,
    ) -> None:
        if not eps > 0 or not nu > 0 or max_iter < 1 or check_every < 1:
            raise ValueError("gm: need eps > 0, nu > 0, max_iter >= 1, check_every >= 1")
        if init not in ("median", "mean") or solver not in ("auto", "direct", "gram"):
            raise ValueError(f"gm: invalid init={init!r} or solver={solver!r}")
        self.eps, self.max_iter, self.nu = float(eps), int(max_iter), float(nu)
        self.init, self.solver, self.check_every = init, solver, int(check_every)

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        r = geometric_median(
            x,
            weights,
            eps=self.eps,
            max_iter=self.max_iter,
            nu=self.nu,
            init=self.init,
            solver=self.solver,
            check_every=self.check_every,
        )
        return AggregationResult(
            r.median,
            iterations=r.iterations,
            converged=r.converged,
            objective=r.objective,
            weights=r.weights,
            extra={"gram_solver": float(r.solver == "gram")},
        )


BUILTINS: dict[str, Callable[..., Aggregator]] = {"gm": GeometricMedian}
