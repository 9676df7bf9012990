r"""Residual (error-feedback) memory for block coordinate descent (SPEC §3.3).

Each round the server forms :math:`P_t = \gamma_s G_t + M_t`, keeps the block :math:`C_k(P_t)` and
stores the residual :math:`M_{t+1} = P_t - C_k(P_t)` (the columns outside the block).

* ``per_client`` (Algorithm 3): one residual row per client, keyed by the client's stable int id,
  so partial participation works: only the rows of the clients present in a round are read and
  written. A client seen for the first time has a zero residual.
* ``mean`` (Algorithm 1): one vector :math:`\hat m_t` added to every row;
  :math:`\hat m_{t+1}` = mean over rows of :math:`P_t - C_k(P_t)`.
* ``none``: no memory, :math:`P_t = \gamma_s G_t`.

Protocol used by :func:`fedbgmd.core.bgmd_step`: ``combine(x, step_size, client_ids) -> P``
only reads the memory and returns a new tensor (never the caller's ``x`` unless the memory keeps
nothing); ``commit(client_ids, P, selected)`` stores the residual of P outside ``selected`` (``P``
may be modified in place). Nothing is stored before ``commit``: a step that raises in between
leaves the memory and its norm bitwise unchanged (all-or-nothing). All memories have ``norm()``, ``state_dict()``, ``load_state_dict()``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedbgmd.core.norms import row_norms, weighted_row_mean
from fedbgmd.core.registry import Registry

__all__ = ["MEMORIES", "MeanMemory", "Memory", "NoMemory", "PerClientMemory", "make_memory"]


class Memory(ABC):
    """Base class of the residual memories; ``dim`` is the model dimension d."""

    def __init__(
        self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if dim < 1:
            raise ValueError(f"memory dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    def _check(self, x: Tensor, client_ids: Sequence[int]) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) messages, got {tuple(x.shape)}")
        if len(client_ids) != x.shape[0]:
            raise ValueError(f"{len(client_ids)} client ids for {x.shape[0]} rows")
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("client ids must be distinct")

    @abstractmethod
    def combine(self, x: Tensor, step_size: float, client_ids: Sequence[int]) -> Tensor:
        """Return P = step_size * x + M for the given clients (the caller may modify it)."""

    @abstractmethod
    def commit(
        self,
        client_ids: Sequence[int],
        p: Tensor,
        selected: Tensor,
        residual_sq: float | None = None,
    ) -> None:
        """Store the residual P − C_k(P) (P with the ``selected`` columns zeroed).

        ``residual_sq`` = ||P − C_k(P)||² when the caller already knows it (saves a pass).
        """

    def forget(self, client_ids: Sequence[int]) -> None:
        """Clear the residual of these clients: their P = γx + M overflowed (``bgmd_step``
        drops their rows), so what is stored for them is no residual worth keeping."""
        return None  # a memory that keeps nothing has nothing to clear

    @abstractmethod
    def norm(self) -> float:
        """Frobenius norm of the whole stored residual."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (tensors and client ids)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""


class NoMemory(Memory):
    """No error feedback: P = step_size * x, nothing stored."""

    def combine(self, x: Tensor, step_size: float, client_ids: Sequence[int]) -> Tensor:
        self._check(x, client_ids)
        return x if step_size == 1.0 else x * step_size

    def commit(
        self,
        client_ids: Sequence[int],
        p: Tensor,
        selected: Tensor,
        residual_sq: float | None = None,
    ) -> None:
        return None

    def norm(self) -> float:
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "none", "dim": self.dim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "none" or state.get("dim") != self.dim:
            raise ValueError("state_dict does not belong to a NoMemory of this dim")


class MeanMemory(Memory):
    """One residual vector m̂ (d,) shared by all rows (Algorithm 1)."""

    def __init__(
        self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(dim, device, dtype)
        self.m = torch.zeros(self.dim, device=self.device, dtype=dtype)

    def combine(self, x: Tensor, step_size: float, client_ids: Sequence[int]) -> Tensor:
        self._check(x, client_ids)
        return torch.add(self.m.to(x.dtype), x, alpha=step_size)

    def commit(
        self,
        client_ids: Sequence[int],
        p: Tensor,
        selected: Tensor,
        residual_sq: float | None = None,
    ) -> None:
        m = weighted_row_mean(p)
        m[selected] = 0
        self.m = m.to(device=self.device, dtype=self.dtype)

    def forget(self, client_ids: Sequence[int]) -> None:
        # one vector is added to every row: it cannot be cleared for some clients only, and a
        # row overflowed because of it or of a client's message; either way it is cleared
        if client_ids:
            self.m.zero_()

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.m, dtype=torch.float64))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mean", "dim": self.dim, "m": self.m.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mean" or state["m"].shape != (self.dim,):
            raise ValueError("state_dict does not belong to a MeanMemory of this dim")
        self.m = state["m"].to(device=self.device, dtype=self.dtype).clone()


class PerClientMemory(Memory):
    """One residual row per client id, stored in a growable (capacity, d) matrix.

    ``_rows`` maps a client id to its row; ``_row_sq`` caches each row's squared norm so that
    :meth:`norm` costs O(#clients). When the caller passes the round's residual total
    (``bgmd_step`` knows it from the column norms), the present rows' individual norms are only
    computed when a later round does not include all of them.
    """

    def __init__(
        self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(dim, device, dtype)
        self._rows: dict[int, int] = {}
        self._store = torch.zeros(0, self.dim, device=self.device, dtype=dtype)
        self._row_sq = torch.zeros(0, dtype=torch.float64)
        self._group: list[int] = []
        self._group_sq = 0.0

    @property
    def client_ids(self) -> list[int]:
        """Ids with a stored residual, in row order."""
        return sorted(self._rows, key=self._rows.__getitem__)

    def _row_index(self, client_ids: Sequence[int]) -> list[int]:
        """Rows of ``client_ids``, registering the new ones (called by :meth:`commit` only)."""
        new = [int(c) for c in client_ids if int(c) not in self._rows]
        if new:
            start = len(self._rows)
            need = start + len(new)
            if need > self._store.shape[0]:
                cap = max(need, 2 * self._store.shape[0])
                grown = torch.zeros(cap, self.dim, device=self.device, dtype=self.dtype)
                grown[:start] = self._store[:start]
                self._store = grown
                sq = torch.zeros(cap, dtype=torch.float64)
                sq[:start] = self._row_sq[:start]
                self._row_sq = sq
            for i, c in enumerate(new):
                self._rows[c] = start + i
        return [self._rows[int(c)] for c in client_ids]

    def combine(self, x: Tensor, step_size: float, client_ids: Sequence[int]) -> Tensor:
        # Reads only: P is a new tensor and new ids are registered at commit, so a step that
        # raises between combine and commit leaves the memory (and its cached norm) unchanged.
        self._check(x, client_ids)
        known = [(i, self._rows[int(c)]) for i, c in enumerate(client_ids) if int(c) in self._rows]
        p = torch.zeros(x.shape, device=x.device, dtype=x.dtype)
        if known:
            pos = torch.tensor([i for i, _ in known], device=x.device)
            idx = torch.tensor([r for _, r in known], device=self.device)
            m = self._store.index_select(0, idx).to(device=x.device, dtype=x.dtype)
            p.index_copy_(0, pos, m)
        return p.add_(x, alpha=step_size)

    def commit(
        self,
        client_ids: Sequence[int],
        p: Tensor,
        selected: Tensor,
        residual_sq: float | None = None,
    ) -> None:
        rows = self._row_index(client_ids)
        p.index_fill_(1, selected, 0.0)
        idx = torch.tensor(rows, device=self.device)
        self._store.index_copy_(0, idx, p.to(device=self.device, dtype=self.dtype))
        self._flush_group(keep=rows)
        if residual_sq is None:
            self._row_sq[torch.tensor(rows)] = self._rows_sq(rows)
        else:  # row norms of this group are computed only if later needed separately
            self._group, self._group_sq = rows, float(residual_sq)

    def _rows_sq(self, rows: list[int]) -> Tensor:
        idx = torch.tensor(rows, device=self.device)
        return _sq_norms(self._store.index_select(0, idx))

    def forget(self, client_ids: Sequence[int]) -> None:
        known = [self._rows[int(c)] for c in client_ids if int(c) in self._rows]
        if not known:
            return
        self._flush_group(keep=[])  # cached norms of the last round's rows, before any change
        self._store[torch.tensor(known, device=self.device)] = 0.0
        self._row_sq[torch.tensor(known)] = 0.0

    def _flush_group(self, keep: list[int]) -> None:
        """Give the last round's rows that are not in ``keep`` their own cached norms."""
        stale = sorted(set(self._group) - set(keep))
        if stale:
            self._row_sq[torch.tensor(stale)] = self._rows_sq(stale)
        self._group, self._group_sq = [], 0.0

    def norm(self) -> float:
        """Frobenius norm of all stored residual rows (O(#clients) after a full-round commit)."""
        used = len(self._rows)
        if not self._group:
            return float(self._row_sq[:used].sum().sqrt())
        mask = torch.ones(used, dtype=torch.bool)
        mask[torch.tensor(self._group)] = False
        return math.sqrt(max(self._group_sq + float(self._row_sq[:used][mask].sum()), 0.0))

    def residual(self, client_id: int) -> Tensor:
        """Copy of the stored residual of ``client_id`` (zeros if never seen)."""
        if int(client_id) not in self._rows:
            return torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        return self._store[self._rows[int(client_id)]].clone()

    def state_dict(self) -> dict[str, Any]:
        ids = self.client_ids
        return {
            "kind": "per_client",
            "dim": self.dim,
            "client_ids": ids,
            "rows": self._store[: len(ids)].clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "per_client" or state.get("dim") != self.dim:
            raise ValueError("state_dict does not belong to a PerClientMemory of this dim")
        ids = [int(c) for c in state["client_ids"]]
        rows = state["rows"].to(device=self.device, dtype=self.dtype)
        if rows.shape != (len(ids), self.dim):
            raise ValueError("state_dict rows do not match its client ids")
        self._rows = {c: i for i, c in enumerate(ids)}
        self._store = rows.clone()
        self._group, self._group_sq = [], 0.0
        self._row_sq = _sq_norms(rows)


def _sq_norms(rows: Tensor) -> Tensor:
    """Squared row norms on the host; float64 where float32 squares overflow (|x| ≳ 1e19, a
    hostile client's residual), so the memory norm stays finite."""
    sq = row_norms(rows).square_().cpu()
    if rows.dtype != torch.float64 and not bool(torch.isfinite(sq).all()):
        sq = row_norms(rows.to(torch.float64)).square_().cpu()
    return sq


def _load_builtins(reg: Registry[Memory]) -> None:
    reg._add("per_client", PerClientMemory)
    reg._add("mean", MeanMemory)
    reg._add("none", NoMemory)


# factory(dim, device=None, dtype=float32, **params) -> Memory; a user memory subclasses Memory
MEMORIES: Registry[Memory] = Registry("memory", _load_builtins)


def make_memory(
    kind: str,
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Memory:
    """Build the memory registered as ``kind`` (``"per_client"``, ``"mean"``, ``"none"`` or a
    user's, see MEMORIES); unknown -> ValueError listing the valid kinds."""
    return MEMORIES.build(kind, dim=dim, device=device, dtype=dtype)
