r"""One server step of FL-BGMD (SPEC §3.3/§3.5; Algorithm 3 of Acharya et al., AISTATS 2022).

Given the round's stacked messages :math:`G_t \in \mathbb{R}^{n\times d}` (one row per client id):

1. :math:`P_t = \gamma_s G_t + M_t` (memory rows of the present clients; ``mean`` memory adds
   :math:`\hat m_t` to every row; ``none`` adds nothing);
2. :math:`I_k` = ``select_block`` on :math:`P_t` (column squared norms, k columns);
3. :math:`\Delta_t = P_t[:, I_k] \in \mathbb{R}^{n\times k}`;
4. :math:`\tilde g = \mathrm{Agg}(\Delta_t) \in \mathbb{R}^k` (with the client weights if
   given), scattered into :math:`0 \in \mathbb{R}^d`;
5. :math:`M_{t+1} = P_t - C_k(P_t)` is stored (per client / as the row mean / discarded). If the
   aggregator refuses the block (it raises ``AggregationRefused``, e.g. Krum with too few rows), no block
   is applied and :math:`M_{t+1} = P_t`: the round's mass stays in the memory instead of being
   lost.

All-or-nothing: the memory is written only by that final commit (or the refusal's). Any other
exception (a selector returning a wrong shape, an aggregator failing otherwise, every row
overflowing) leaves the memory and its norm bitwise unchanged, whatever the order of the ids.

The server then applies :math:`x_{t+1} = x_t - \tilde g` (sign conventions are the caller's).
Diagnostics: relative residual :math:`\lVert P - C_k(P)\rVert^2 / \lVert P\rVert^2` (computed from
the column norms, Lemma 1) and the memory norm.

Non-finite policy: rows of :math:`G_t` with NaN/Inf are dropped *before* touching the memory
(those clients' residuals are left unchanged) and counted in ``aggregation.n_dropped``. A finite
row can still overflow when combined, :math:`\gamma_s G_t + M_t` (a client sending FLT_MAX
twice): such rows of :math:`P_t` are dropped too, their clients' residuals are cleared
(:meth:`~fedbgmd.core.memory.Memory.forget`: a residual that overflows with a finite message is
no residual worth keeping) and they are listed in ``overflowed``, so the memory never stores Inf/NaN and its norm stays finite.
With k = d, memory ``none`` and step size 1 the result equals ``aggregator(G_t).vector`` exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedbgmd.core.aggregation import AggregationResult, Aggregator
from fedbgmd.core.counts import block_size
from fedbgmd.core.errors import AggregationRefused
from fedbgmd.core.memory import MEMORIES, Memory, make_memory
from fedbgmd.core.nonfinite import drop_nonfinite_rows
from fedbgmd.core.selection import SELECTORS, column_sq_norms, select_from_norms

__all__ = ["BlockStep", "BlockStepResult", "bgmd_step"]


@dataclass(frozen=True)
class BlockStepResult:
    """Result of :func:`bgmd_step`.

    Attributes:
        vector: (d,) aggregated block scattered into zeros, dtype/device of the input.
        selected: (k,) sorted int64 column indices I_k.
        aggregation: the aggregator's result on the (n, k) block.
        relative_residual: ||P − C_k(P)||² / ||P||² (0 when P = 0).
        memory_norm: Frobenius norm of the memory after the step.
        overflowed: ids of the clients whose row of P = γ_s G + M was not finite (dropped, also
            counted in ``aggregation.n_dropped``).
    """

    vector: Tensor
    selected: Tensor
    aggregation: AggregationResult
    relative_residual: float
    memory_norm: float
    overflowed: tuple[int, ...] = ()


def _finite_rows(
    x: Tensor, client_ids: list[int], weights: Tensor | None
) -> tuple[Tensor, list[int], Tensor | None, int]:
    xf, wf, n_dropped = drop_nonfinite_rows(x, weights)
    if n_dropped == 0:
        return x, client_ids, weights, 0
    # the rows drop_nonfinite_rows kept (its rule: the row and its weight finite)
    ok = torch.isfinite(x).all(dim=1)
    if weights is not None:
        ok &= torch.isfinite(weights).to(ok.device)
    return xf, [c for c, keep in zip(client_ids, ok.tolist()) if keep], wf, n_dropped


def bgmd_step(
    x: Tensor,
    aggregator: Aggregator,
    k: int,
    memory: Memory,
    client_ids: Sequence[int],
    step_size: float = 1.0,
    selector: str = "sample",
    generator: torch.Generator | None = None,
    weights: Tensor | None = None,
) -> BlockStepResult:
    """One block-coordinate aggregation step with residual memory (see module docstring).

    Args:
        x: (n, d) messages G_t, one row per entry of ``client_ids``.
        aggregator: any registered aggregator (GM for FL-BGMD).
        k: block size, 1 <= k <= d.
        memory: a memory from :func:`fedbgmd.core.make_memory` with ``dim == d``.
        client_ids: stable int ids of the rows (distinct).
        step_size: γ_s scaling the messages.
        selector: registered selector name.
        generator: torch.Generator on ``x.device`` for random selectors.
        weights: optional (n,) client weights, passed to the aggregator with the block (the
            selection and the memory do not use them).

    Raises:
        ValueError: on bad shapes, ids or k (memory unchanged). AggregationRefused (the
            aggregator's refusal, e.g. Krum with too few rows) after all of P_t went into the
            memory (nothing of the round is lost). Any other exception leaves the memory unchanged.
    """
    ids = [int(c) for c in client_ids]
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ValueError(f"need one client id per row: {len(ids)} ids, shape {tuple(x.shape)}")
    xf, ids, weights, n_dropped = _finite_rows(x, ids, weights)
    d = xf.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"block size k must be in [1, d={d}], got {k}")
    p = memory.combine(xf, step_size, ids)
    s, total = _column_norms(p)
    overflowed: list[int] = []
    if not math.isfinite(total):  # some row of P = γG + M overflowed (its G row was finite)
        p, ids, weights, overflowed = _drop_overflowed(p, ids, weights, memory)
        n_dropped += len(overflowed)
        s, total = _column_norms(p)
    sel = select_from_norms(s, k, selector, generator)
    delta = p if k == d else p.index_select(1, sel)
    kept = float(s.index_select(0, sel).sum(dtype=torch.float64))
    rel = max(total - kept, 0.0) / total if total > 0 else 0.0
    if k == d and delta is not x:
        delta = delta.clone()
    try:
        agg = aggregator(delta, weights)
    except AggregationRefused:
        # refused: no block is applied this round, so all of P_t stays in the memory
        memory.commit(ids, p, sel[:0], residual_sq=total)
        raise
    memory.commit(ids, p, sel, residual_sq=max(total - kept, 0.0))
    if n_dropped:
        agg = dataclasses.replace(agg, n_dropped=agg.n_dropped + n_dropped)
    if k == d:
        vec = agg.vector
    else:
        vec = torch.zeros(d, dtype=agg.vector.dtype, device=agg.vector.device)
        vec.index_copy_(0, sel, agg.vector)
    return BlockStepResult(vec, sel, agg, rel, memory.norm(), tuple(overflowed))


def _column_norms(p: Tensor) -> tuple[Tensor, float]:
    """Column squared norms of P and their float64 total (inf/NaN when P is not finite)."""
    s = column_sq_norms(p)
    total = float(s.sum(dtype=torch.float64))
    if math.isinf(total) and p.dtype != torch.float64:
        # finite entries whose squares overflow p's dtype (|x| >~ 1e19 in float32, a hostile
        # client's): inf norms would make the sampling degenerate and the residual NaN
        s = column_sq_norms(p.to(torch.float64))
        total = float(s.sum())
    return s, total


def _drop_overflowed(
    p: Tensor, ids: list[int], weights: Tensor | None, memory: Memory
) -> tuple[Tensor, list[int], Tensor | None, list[int]]:
    """Drop the rows of P that are not finite and clear their clients' residuals."""
    ok = torch.isfinite(p).all(dim=1).tolist()
    bad = [c for c, keep in zip(ids, ok) if not keep]
    if len(bad) == len(ids):  # raised before forget: a step that raises stores nothing
        raise AggregationRefused(
            f"every row of P = γG + M overflowed (clients {bad}); nothing to aggregate"
        )
    memory.forget(bad)
    keep = torch.tensor([i for i, k in enumerate(ok) if k], device=p.device)
    kept_w = None if weights is None else weights.index_select(0, keep.to(weights.device))
    return p.index_select(0, keep), [c for c, k in zip(ids, ok) if k], kept_w, bad


class BlockStep:
    r"""FL-BGMD's server-side block step as a reusable object (Algorithm 3, lines 23-26).

    Holds what persists between rounds: the block fraction β (k = ⌈β·d⌉, :func:`block_size`),
    the selector, the residual memory :math:`M_t` (created on the first round, when d is known)
    and where each round's selection randomness comes from (``generator_for(round)``). One call
    is one round: :math:`P_t = \gamma G_t + M_t`, :math:`\Delta_t = C_k(P_t)`,
    :math:`M_{t+1} = P_t - \Delta_t`, :math:`\tilde g_t = \mathrm{Agg}(\Delta_t)` scattered into
    :math:`\mathbb{R}^d` (see :func:`bgmd_step`, which it calls).

    Stateful: :meth:`state_dict` / :meth:`load_state_dict` carry the memory for checkpoints.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        beta: float = 0.1,
        selector: str = "sample",
        memory: str = "per_client",
        *,
        device: torch.device | str = "cpu",
        generator_for: Callable[[int], torch.Generator | None] | None = None,
    ) -> None:
        if getattr(aggregator, "stateful", False):
            # its state (e.g. cclip's previous output) lives on the coordinates of the last
            # call; the block step draws other coordinates every round
            raise ValueError(
                f"aggregator {aggregator!r} keeps state between rounds: not usable in the block "
                "step (use a stateless form, e.g. cclip with center=median)"
            )
        # named here, not in round 1: the constructor is the API a Flower app calls
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and 0 < beta <= 1):
            raise ValueError(f"beta (the block fraction) must be in (0, 1], got {beta!r}")
        if isinstance(selector, str):
            SELECTORS.factory(selector)  # unknown name: ValueError listing the valid ones
        elif not callable(selector):
            raise TypeError(f"selector must be a registered name or a callable, got {selector!r}")
        MEMORIES.factory(memory)
        self.aggregator = aggregator
        self.beta = beta
        self.selector = selector
        self.memory_kind = memory
        self.device = torch.device(device)
        self.generator_for = generator_for
        self.memory: Memory | None = None  # M_t, created for d on the first round

    def k(self, dim: int) -> int:
        """Block size k = ⌈β·d⌉ in [1, d] (the guarded rule of :func:`block_size`)."""
        return block_size(self.beta, dim)

    def __call__(
        self,
        updates: Tensor,
        client_ids: Sequence[int],
        server_round: int,
        *,
        step_size: float = 1.0,
        weights: Tensor | None = None,
    ) -> BlockStepResult:
        """One round on the (n, d) messages G_t, rows keyed by ``client_ids``."""
        dim = updates.shape[1]
        memory = self._memory_for(dim)
        return bgmd_step(
            updates,
            aggregator=self.aggregator,
            k=self.k(dim),
            memory=memory,
            client_ids=client_ids,
            step_size=step_size,
            selector=self.selector,
            generator=None if self.generator_for is None else self.generator_for(server_round),
            weights=weights,
        )

    def _memory_for(self, dim: int) -> Memory:
        if self.memory is None:
            self.memory = make_memory(
                self.memory_kind, dim=dim, device=self.device, dtype=torch.float32
            )
        return self.memory

    def state_dict(self) -> dict[str, Any]:
        """``{"memory": the memory's state or None}`` (None before the first round)."""
        return {"memory": None if self.memory is None else self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mem = state.get("memory")
        if mem is not None:
            self._memory_for(int(mem["dim"])).load_state_dict(mem)
