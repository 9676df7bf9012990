r"""Distance-based selection rules: ``krum``, ``multikrum`` (Blanchard et al., NeurIPS 2017) and
``bulyan`` (El Mhamdi, Guerraoui & Rouault, ICML 2018).

Notation: n finite rows :math:`x_i`, f = assumed number of Byzantine rows,
:math:`D_{ij} = \lVert x_i - x_j \rVert^2` (from a centred float64 Gram matrix, see
:mod:`fedbgmd.core.gram`).

* Krum score :math:`s_i = \sum_{j \in N_i} D_{ij}` where :math:`N_i` are the q = n − f − 2 rows
  closest to :math:`x_i` (j ≠ i; q clamped to [1, n − 1]). ``krum`` returns :math:`x_{i^\star}`,
  :math:`i^\star = \arg\min_i s_i` (ties: lowest index). Requires n >= 2f + 3 when f > 0.
* ``multikrum``: the mean (weighted when weights are given) of the m rows with the lowest
  scores; m defaults to n − f.
* ``bulyan`` (requires n >= 4f + 3), the paper's Algorithm 1: select θ = n − 2f rows one at a
  time, each by Krum (same f, q = |R| − f − 2 clamped as above) on the rows R not chosen yet;
  then for every coordinate j average the kept = θ − 2f selected values (the paper's β) closest to the
  coordinate-wise median of the selection.
* ``bulyan_multikrum``: the vectorised variant: the θ rows of lowest Krum score on all n rows
  (one-shot Multi-Krum), then the same trimmed aggregate. Not the paper's rule: a row's score
  counts distances to rows the recursion would already have removed.

``selected`` holds the indices of the rows used; ``weights`` the Krum scores on all n rows (not
for ``bulyan``, whose recursion rescores the remaining rows at every step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.coordinatewise import coordinate_median
from fedbgmd.core.errors import AggregationRefused
from fedbgmd.core.gram import robust_centred_gram
from fedbgmd.core.norms import weighted_row_mean

__all__ = ["Bulyan", "BulyanMultiKrum", "Krum", "MultiKrum", "krum_scores", "recursive_krum"]


def _sq_distances(x: Tensor) -> Tensor:
    """(n, n) squared distances ||x_i − x_j||² in float64, +inf on the diagonal."""
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64, device=x.device)
    g, _ = robust_centred_gram(x, w)
    diag = g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min_(0.0)
    return d2.fill_diagonal_(float("inf"))


def _scores(d2: Tensor, f: int) -> Tensor:
    """Krum scores from the squared distances of the rows at hand (n = d2.shape[0] >= 2)."""
    n = d2.shape[0]
    q = min(max(n - f - 2, 1), n - 1)
    return torch.sort(d2, dim=1).values[:, :q].sum(dim=1)


def krum_scores(x: Tensor, f: int) -> Tensor:
    """Krum scores (n,) in float64 on the host (see module docstring)."""
    if x.shape[0] == 1:
        return torch.zeros(1, dtype=torch.float64)
    return _scores(_sq_distances(x), f)


def recursive_krum(x: Tensor, f: int, theta: int) -> Tensor:
    """Bulyan's selection (El Mhamdi et al. 2018, Alg. 1): ``theta`` rows, each the Krum choice
    (lowest score, ties by index) among the rows not chosen yet. Returns their indices in the
    order chosen.

    The distances are computed and each row's neighbours sorted once; a step rescores the
    remaining rows from their sorted lists with the chosen rows masked out (O(n²), no sort), so
    the selection stays on the device without host round trips.
    """
    n = x.shape[0]
    if n == 1:
        return torch.zeros(min(theta, 1), dtype=torch.int64)
    vals, order = torch.sort(_sq_distances(x), dim=1)  # own (inf) distance last in each row
    alive = torch.ones(n, dtype=torch.bool, device=vals.device)
    inf = torch.tensor(float("inf"), dtype=vals.dtype, device=vals.device)
    chosen = []
    for m in range(n, n - theta, -1):  # m rows remain
        if m == 1:
            chosen.append(torch.argmax(alive.to(torch.int8)))
            break
        q = min(max(m - f - 2, 1), m - 1)
        nb = alive[order]  # remaining neighbours, in each row's order of distance
        take = nb & (nb.cumsum(dim=1) <= q)
        scores = torch.where(take, vals, 0.0).sum(dim=1)
        i = torch.argmin(torch.where(alive, scores, inf))  # first minimum: ties by index
        chosen.append(i)
        alive[i] = False
    return torch.stack(chosen).cpu()


def _check_f(name: str, f: int) -> int:
    if f < 0:
        raise ValueError(f"{name}: f must be >= 0, got {f}")
    return int(f)


def _lowest(scores: Tensor, m: int) -> Tensor:
    """Indices of the m lowest scores (stable: ties by index), sorted ascending."""
    order = torch.sort(scores, stable=True).indices[:m]
    return torch.sort(order).values


class Krum(Aggregator):
    """Krum: the row with the smallest sum of squared distances to its n − f − 2 neighbours.

    Args:
        f: assumed number of Byzantine rows, >= 0.
    """

    name = "krum"

    def __init__(self, f: int = 0) -> None:
        self.f = _check_f("krum", f)

    def min_rows(self) -> int:
        return 2 * self.f + 3 if self.f > 0 else 1

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        scores = krum_scores(x, self.f)
        sel = _lowest(scores, 1)
        return AggregationResult(
            x[int(sel[0])].clone(),
            weights=scores.to(device=x.device, dtype=x.dtype),
            selected=sel.to(x.device),
        )


class MultiKrum(Aggregator):
    """Multi-Krum: mean of the m rows with the lowest Krum scores.

    Args:
        f: assumed number of Byzantine rows, >= 0.
        m: rows averaged, 1 <= m <= n; None means n − f.
    """

    name = "multikrum"
    supports_weights = True

    def __init__(self, f: int = 0, m: int | None = None) -> None:
        self.f = _check_f("multikrum", f)
        if m is not None and m < 1:
            raise ValueError(f"multikrum: m must be >= 1, got {m}")
        self.m = m

    def min_rows(self) -> int:
        return 2 * self.f + 3 if self.f > 0 else 1

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        n = x.shape[0]
        m = n - self.f if self.m is None else self.m
        if not 1 <= m <= n:
            raise AggregationRefused(f"multikrum: m={m} must be in [1, n={n}]")
        scores = krum_scores(x, self.f)
        sel = _lowest(scores, m).to(x.device)
        # mean of the selected rows as one matrix-vector product (no copy of the rows)
        coef = torch.zeros(n, dtype=torch.float64, device=x.device)
        if weights is None:
            coef[sel] = 1.0
        else:
            coef[sel] = weights.to(device=x.device, dtype=torch.float64).index_select(0, sel)
            if not float(coef.sum()) > 0:
                raise AggregationRefused("multikrum: selected rows have zero total weight")
        vec = weighted_row_mean(x, coef)
        return AggregationResult(
            vec, weights=scores.to(device=x.device, dtype=x.dtype), selected=sel
        )


def _trimmed_around_median(s: Tensor, kept: int) -> Tensor:
    """Per coordinate, the mean of the ``kept`` values of ``s`` closest to their median."""
    med = coordinate_median(s)
    closest = torch.topk((s - med).abs(), kept, dim=0, largest=False).indices
    return torch.gather(s, 0, closest).mean(dim=0, dtype=torch.float64).to(s.dtype)


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al. 2018, Alg. 1): n − 2f rows chosen by recursive Krum, then a
    coordinate-wise trimmed aggregate around the selection's median.

    Args:
        f: assumed number of Byzantine rows, >= 0; needs n >= 4f + 3.
    """

    name = "bulyan"

    def __init__(self, f: int = 0) -> None:
        self.f = _check_f("bulyan", f)

    def min_rows(self) -> int:
        return 4 * self.f + 3

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        n = x.shape[0]
        theta = n - 2 * self.f
        kept = theta - 2 * self.f  # the paper's β: values averaged per coordinate
        sel = torch.sort(recursive_krum(x, self.f, theta)).values.to(x.device)
        vec = _trimmed_around_median(x.index_select(0, sel), kept)
        return AggregationResult(
            vec, selected=sel, extra={"theta": float(theta), "kept": float(kept)}
        )


class BulyanMultiKrum(Bulyan):
    """Bulyan's vectorised variant: the θ = n − 2f rows of lowest one-shot Krum score (not the
    paper's recursion), then the same trimmed aggregate. ``weights`` holds the Krum scores."""

    name = "bulyan_multikrum"

    def _aggregate(self, x: Tensor, weights: Tensor | None) -> AggregationResult:
        n = x.shape[0]
        theta = n - 2 * self.f
        kept = theta - 2 * self.f  # the paper's β: values averaged per coordinate
        scores = krum_scores(x, self.f)
        sel = _lowest(scores, theta).to(x.device)
        vec = _trimmed_around_median(x.index_select(0, sel), kept)
        return AggregationResult(
            vec,
            weights=scores.to(device=x.device, dtype=x.dtype),
            selected=sel,
            extra={"theta": float(theta), "kept": float(kept)},
        )


BUILTINS: dict[str, Callable[..., Aggregator]] = {
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "bulyan_multikrum": BulyanMultiKrum,
}
