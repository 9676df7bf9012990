"""Min-Max and Min-Sum (Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model
Poisoning Attacks and Defenses for Federated Learning", NDSS 2021) — omniscient, SIMULATION ONLY.

Notation: honest rows h_1..h_n ∈ R^d, μ their mean, p a perturbation direction, γ >= 0. Every
Byzantine client sends the same row ``m(γ) = μ + γ · p``. Directions (``perturbation``):

* ``"std"`` (default, the paper's best):  p = −σ, σ the coordinate-wise sample std of the h_i;
* ``"unit_vec"``:                          p = −μ / ‖μ‖;
* ``"sign"``:                              p = −sign(μ).

**Min-Max** chooses the largest γ such that the malicious row is no farther from any honest row
than the two most distant honest rows are from each other:

    max_i ‖m(γ) − h_i‖ <= R := max_{i,j} ‖h_i − h_j‖.

**Min-Sum** chooses the largest γ with the sum of squared distances bounded the same way:

    Σ_i ‖m(γ) − h_i‖² <= S := max_i Σ_j ‖h_i − h_j‖².

The paper finds γ by a binary search. Here the search is solved in closed form (vectorised,
exact): with D_i = μ − h_i, c_i = ‖D_i‖², b_i = ⟨D_i, p⟩, a = ‖p‖²,

    ‖m(γ) − h_i‖² = a γ² + 2 b_i γ + c_i,

a convex quadratic that is <= R² at γ = 0 (the mean is within R of every h_i), so the feasible set
is an interval containing 0 and its right end is

    γ* = min_i (−b_i + sqrt(b_i² + a (R² − c_i))) / a            (Min-Max),
    γ* = sqrt((S − Σ_i c_i) / (n a))    (Σ_i b_i = 0)               (Min-Sum),

which is the limit of the paper's binary search. ``gamma_max`` optionally caps γ (the authors' code
starts its search at γ = 10, which caps γ near 20). If a = 0 (e.g. identical honest rows with
p = −σ) the direction is null and μ is returned. Computed in float64, returned in the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedbgmd.attacks.base import (
    OmniscientAttack,
    check_choice,
    check_honest,
    check_int,
    check_positive,
    coordinate_stats,
)

__all__ = [
    "PERTURBATIONS",
    "OmniscientAgrTailored",
    "OmniscientMinMax",
    "OmniscientMinSum",
    "perturbation_direction",
]

PERTURBATIONS: tuple[str, ...] = ("std", "unit_vec", "sign")


def perturbation_direction(honest: Tensor, kind: str) -> Tensor:
    """The direction p of the module docstring for ``honest`` (n, d): ``−σ``, ``−μ/‖μ‖``, ``−sign(μ)``."""
    check_choice("perturbation", kind, PERTURBATIONS)
    mu, sigma = coordinate_stats(honest)
    if kind == "std":
        return -sigma
    if kind == "sign":
        return -torch.sign(mu)
    norm = torch.linalg.vector_norm(mu)
    return -mu / norm if norm > 0 else torch.zeros_like(mu)


@dataclass(frozen=True)
class _MinMaxBase(OmniscientAttack):
    perturbation: str = "std"
    gamma_max: float | None = None

    def __post_init__(self) -> None:
        check_choice("perturbation", self.perturbation, PERTURBATIONS)
        if self.gamma_max is not None:
            check_positive("gamma_max", self.gamma_max)

    def _solve(self, h: Tensor, p: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gamma(self, honest: Tensor) -> float:
        """The γ* (float) used for these ``honest`` rows (n, d)."""
        check_honest(honest, 0)
        h = honest.detach().to(torch.float64)
        p = perturbation_direction(h, self.perturbation)
        a = torch.dot(p, p)
        if a <= 0:
            return 0.0
        g = float(self._solve(h, p))
        g = max(g, 0.0)
        return min(g, self.gamma_max) if self.gamma_max is not None else g

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        h = honest.detach().to(torch.float64)
        row = h.mean(dim=0) + self.gamma(honest) * perturbation_direction(h, self.perturbation)
        return row.to(honest.dtype).unsqueeze(0).repeat(num_byzantine, 1)


def _sq_pairwise(h: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``h`` (n, n), float64, clamped at 0."""
    return torch.cdist(h, h).square()


@dataclass(frozen=True)
class OmniscientMinMax(_MinMaxBase):
    """Min-Max: ``μ + γ*·p`` with the largest γ keeping max_i ‖m − h_i‖ <= max_{i,j} ‖h_i − h_j‖.

    ``perturbation`` ∈ {"std", "unit_vec", "sign"} (default "std"); ``gamma_max`` optional cap.
    See the module docstring for the closed form.
    """

    name: ClassVar[str] = "minmax"

    def _solve(self, h: Tensor, p: Tensor) -> Tensor:
        diff = h.mean(dim=0) - h  # D_i, (n, d)
        c = diff.square().sum(dim=1)
        b = diff @ p
        a = torch.dot(p, p)
        r2 = _sq_pairwise(h).max()
        disc = (b.square() + a * (r2 - c)).clamp_min(0.0)
        return ((-b + disc.sqrt()) / a).min()


@dataclass(frozen=True)
class OmniscientMinSum(_MinMaxBase):
    """Min-Sum: ``μ + γ*·p`` with the largest γ keeping Σ_i ‖m − h_i‖² <= max_i Σ_j ‖h_i − h_j‖².

    Same parameters as :class:`OmniscientMinMax`.
    """

    name: ClassVar[str] = "minsum"

    def _solve(self, h: Tensor, p: Tensor) -> Tensor:
        n = h.shape[0]
        c_sum = (h.mean(dim=0) - h).square().sum()
        s = _sq_pairwise(h).sum(dim=1).max()
        a = torch.dot(p, p)
        return ((s - c_sum).clamp_min(0.0) / (n * a)).sqrt()


@dataclass(frozen=True)
class OmniscientAgrTailored(OmniscientAttack):
    """AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021, §IV-A): search against the
    server's own aggregator.

    Malicious rows are ``m = μ + γ·p`` (μ the honest mean, ``p`` from ``perturbation``); γ is
    chosen to maximise the damage ``‖AGG(H ∪ {m}^f) − μ‖`` of the configured aggregator ``AGG``:
    a geometric grid ``γ_max · 2^-j`` (j = 0 … ``grid``−1) followed by ``refine`` bisection steps
    around the best grid point. Needs the aggregator (the strategy's adversary hook passes it);
    about ``grid + 2·refine`` aggregator calls per round, simulation only.
    """

    name: ClassVar[str] = "agr_tailored"
    perturbation: str = "std"
    gamma_max: float = 100.0
    grid: int = 14
    refine: int = 6

    def __post_init__(self) -> None:
        check_choice("perturbation", self.perturbation, ("std", "unit_vec", "sign"))
        check_positive("gamma_max", self.gamma_max)
        check_int("grid", self.grid, minimum=1)
        check_int("refine", self.refine, minimum=0)

    def damage(
        self,
        honest: Tensor,
        gamma: float,
        num_byzantine: int,
        aggregator: Callable[[Tensor], Tensor],
    ) -> float:
        """‖AGG(H ∪ {μ + γ·p}^f) − μ‖: how far the malicious rows move the aggregate."""
        mu = honest.mean(dim=0)
        p = perturbation_direction(honest, self.perturbation)
        fake = (mu + gamma * p).unsqueeze(0).expand(num_byzantine, -1)
        out = aggregator(torch.cat([honest, fake]))
        return float(torch.linalg.vector_norm(out.to(torch.float64) - mu.to(torch.float64)))

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        if aggregator is None:
            raise ValueError("agr_tailored searches against the server's aggregator; none given")
        h = honest.detach()
        score: dict[float, float] = {}

        def f(g: float) -> float:
            if g not in score:
                score[g] = self.damage(h, g, num_byzantine, aggregator)
            return score[g]

        grid = [self.gamma_max * 2.0**-j for j in range(self.grid)]
        best = max(grid, key=f)
        lo, hi = best / 2, min(best * 2, self.gamma_max)
        for _ in range(self.refine):  # bisection on the side that does more damage
            left, right = (lo + best) / 2, (best + hi) / 2
            if f(left) > f(best) and f(left) >= f(right):
                hi, best = best, left
            elif f(right) > f(best):
                lo, best = best, right
            else:
                lo, hi = left, right
        p = perturbation_direction(h, self.perturbation)
        row = h.mean(dim=0) + best * p
        return row.unsqueeze(0).repeat(num_byzantine, 1)
