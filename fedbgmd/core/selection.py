r"""Block coordinate selection C_k (SPEC §3.2, Algorithm 2 of Acharya et al., AISTATS 2022).

For a stacked matrix :math:`G \in \mathbb{R}^{n \times d}` let :math:`s_j = \lVert G_{:,j} \rVert^2`
(column squared norms). A selector returns a sorted int64 index set :math:`I_k` of k distinct
columns; :math:`C_k(G)` keeps those columns and zeroes the rest.

* ``sample`` — active norm sampling: k distinct columns drawn without replacement with probability
  proportional to :math:`s_j` (successive sampling). Implemented with exponential races
  (Efraimidis & Spirakis 2006): draw :math:`E_j \sim \mathrm{Exp}(1)` and keep the k smallest
  :math:`E_j / s_j` — distributionally identical to ``torch.multinomial(s, k, replacement=False)``
  but O(d) plus one top-k, fast at d = 10⁷. If fewer than k columns have :math:`s_j > 0`, all of
  them are kept and the rest is filled uniformly from the zero columns.
  Lemma 1: :math:`\mathbb{E}\lVert G - C_k(G)\rVert^2 \le (1 - k/d)\lVert G \rVert^2`.
* ``topk`` — the k largest :math:`s_j` (what the authors' code ran); deterministic.
* ``uniform`` — k columns uniformly at random without replacement.

User selectors: ``register_selector(name, fn)`` with ``fn(col_sq_norms, k, generator) -> indices``
(``col_sq_norms`` is the (d,) vector s on the data's device); ``select_block`` sorts and validates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedbgmd.core.registry import Registry

__all__ = [
    "Selector",
    "available_selectors",
    "column_sq_norms",
    "register_selector",
    "select_block",
    "select_from_norms",
]

Selector = Callable[[Tensor, int, "torch.Generator | None"], Tensor]


def column_sq_norms(x: Tensor) -> Tensor:
    """:math:`s_j = \\sum_i x_{ij}^2` for every column, in ``x``'s dtype (d,)."""
    norms: Tensor = torch.linalg.vector_norm(x, dim=0)
    return norms.square_()


def _exp_keys(s: Tensor, generator: torch.Generator | None) -> Tensor:
    e = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    return e.exponential_(generator=generator)


def sample_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Active norm sampling without replacement, probability ∝ s (exponential races)."""
    e = _exp_keys(s, generator)
    pos = s > 0
    n_pos = int(pos.sum())
    if n_pos >= k:
        keys = torch.where(pos, e / s.to(torch.float32), torch.full_like(e, float("inf")))
    else:
        keys = torch.where(pos, torch.full_like(e, -1.0), e)
    return torch.topk(keys, k, largest=False, sorted=False).indices


def topk_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """The k columns with the largest squared norms."""
    return torch.topk(s, k, sorted=False).indices


def uniform_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k columns uniformly at random without replacement."""
    e = _exp_keys(s, generator)
    return torch.topk(e, k, largest=False, sorted=False).indices


def _load_builtins(reg: Registry[Tensor]) -> None:
    reg._add("sample", sample_selector)
    reg._add("topk", topk_selector)
    reg._add("uniform", uniform_selector)


_REGISTRY: Registry[Tensor] = Registry("selector", _load_builtins)


def register_selector(name: str, fn: Selector) -> None:
    """Register ``fn(col_sq_norms, k, generator) -> indices`` under ``name`` (duplicates raise)."""
    _REGISTRY.register(name, fn)


def available_selectors() -> list[str]:
    """Sorted names of all registered selectors."""
    return _REGISTRY.names()


def select_from_norms(
    s: Tensor, k: int, method: str = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """Select k columns given the column squared norms ``s`` (d,); sorted int64 indices."""
    fn = _REGISTRY.factory(method)
    d = s.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"block size k must be in [1, d={d}], got {k}")
    if k == d:
        return torch.arange(d, device=s.device)
    idx = fn(s, k, generator).to(torch.int64)
    idx = torch.sort(idx).values
    if idx.shape != (k,):
        raise ValueError(f"selector {method!r} returned shape {tuple(idx.shape)}, expected ({k},)")
    return idx


def select_block(
    x: Tensor, k: int, method: str = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """Indices I_k (sorted int64, shape (k,), on ``x.device``) of the block C_k keeps.

    Args:
        x: (n, d) stacked messages.
        k: block size, 1 <= k <= d (k = ceil(β d)).
        method: registered selector name ("sample", "topk", "uniform", or user-defined).
        generator: torch.Generator on ``x.device`` for the random selectors (None: torch default).
    """
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    return select_from_norms(column_sq_norms(x), k, method, generator)
