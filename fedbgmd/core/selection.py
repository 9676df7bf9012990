r"""Block coordinate selection C_k (SPEC §3.2, Algorithm 2 of Acharya et al., AISTATS 2022).

For a stacked matrix :math:`G \in \mathbb{R}^{n \times d}` let :math:`s_j = \lVert G_{:,j} \rVert^2`
(column squared norms). A selector returns a sorted int64 index set :math:`I_k` of k distinct
columns; :math:`C_k(G)` keeps those columns and zeroes the rest.

* ``sample`` — active norm sampling: k distinct columns drawn without replacement with probability
  proportional to :math:`s_j` (successive sampling). Implemented with exponential races
  (Efraimidis & Spirakis 2006): draw :math:`E_j = -\log U_j \sim \mathrm{Exp}(1)` and keep the k
  smallest :math:`E_j / s_j` — distributionally identical to ``torch.multinomial(s, k, replacement=False)``
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
    "SELECTORS",
    "Selector",
    "available_selectors",
    "column_sq_norms",
    "register_selector",
    "select_block",
    "select_from_norms",
]

_CPU_CHUNK = 8192

Selector = Callable[[Tensor, int, "torch.Generator | None"], Tensor]


def column_sq_norms(x: Tensor) -> Tensor:
    """:math:`s_j = \\sum_i x_{ij}^2` for every column, in ``x``'s dtype (d,).

    On CPU the columns are processed in cache-sized chunks (a dim-0 reduction over a large
    row-major matrix is several times slower there); elsewhere one fused reduction is used.
    """
    if x.device.type != "cpu":
        norms: Tensor = torch.linalg.vector_norm(x, dim=0)
        return norms.square_()
    if x.shape[1] <= _CPU_CHUNK:
        return (x * x).sum(dim=0)
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype)
    buf = torch.empty(n, _CPU_CHUNK, dtype=x.dtype)
    for start in range(0, d, _CPU_CHUNK):
        block = x[:, start : start + _CPU_CHUNK]
        width = block.shape[1]
        torch.mul(block, block, out=buf[:, :width])
        torch.sum(buf[:, :width], dim=0, out=out[start : start + width])
    return out


def _log_uniform(s: Tensor, generator: torch.Generator | None) -> Tensor:
    """log U_j with U_j ~ Uniform[0, 1) (−E_j for E_j ~ Exp(1)); float32, on ``s.device``."""
    u = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    return u.uniform_(generator=generator).log_()


def sample_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Active norm sampling without replacement, probability ∝ s (exponential races).

    Keys :math:`\\log U_j / s_j = -E_j / s_j`; the k largest keys are the k smallest races
    :math:`E_j / s_j`. Zero columns get key −inf and are only used when fewer than k columns are
    positive; they are then chosen uniformly (by their own races).
    """
    logu = _log_uniform(s, generator)
    n_pos = int((s > 0).sum())
    if n_pos >= k:
        # float64 norms (bgmd_step's fallback when float32 squares overflow) keep their range
        dt = torch.float64 if s.dtype == torch.float64 else torch.float32
        keys = logu.to(dt).div_(s.to(dt))
    else:
        keys = torch.where(s > 0, torch.zeros_like(logu), logu - 1.0)
    return torch.topk(keys, k, sorted=False).indices


def topk_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """The k columns with the largest squared norms."""
    return torch.topk(s, k, sorted=False).indices


def uniform_selector(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k columns uniformly at random without replacement."""
    return torch.topk(_log_uniform(s, generator), k, sorted=False).indices


def _load_builtins(reg: Registry[Selector]) -> None:
    reg._add("sample", sample_selector)
    reg._add("topk", topk_selector)
    reg._add("uniform", uniform_selector)


SELECTORS: Registry[Selector] = Registry(
    "selector", _load_builtins, call_args=("col_sq_norms", "k", "generator")
)


def register_selector(name: str, fn: Selector, *, replace: bool = False) -> None:
    """Register ``fn(col_sq_norms, k, generator) -> indices`` under ``name`` (a taken name
    raises ValueError unless ``replace=True``)."""
    SELECTORS.register(name, fn, replace=replace)


def available_selectors() -> list[str]:
    """Sorted names of all registered selectors."""
    return SELECTORS.names()


def select_from_norms(
    s: Tensor, k: int, method: str = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """Select k columns given the column squared norms ``s`` (d,); sorted int64 indices."""
    fn = SELECTORS.factory(method)
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
