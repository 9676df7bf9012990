"""A fused round's aggregation: the batched GM (one batched Weiszfeld per GM setting), FL-BGMD's
block step batched over the runs that share it, the other aggregators per run, and the
single-run path (fedbgmd.core on the accepted rows) for the runs and rounds the batched code
does not serve. :class:`_Aggregation` is a part of :class:`fedbgmd.fused.group.FusedGroup`."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from fedbgmd.core import AggregationRefused, block_size, geometric_median, make_memory
from fedbgmd.core.agg_gm import GeometricMedian
from fedbgmd.core.batched_gm import batched_geometric_median
from fedbgmd.fused.runs import _Run


@dataclasses.dataclass
class _Agg:
    """One round's aggregation inputs and outputs for the active runs (index j = position)."""

    active: list[int]
    rnd: int
    updates: Tensor  # (R, n, d), rows rewritten by omniscient adversaries
    ids_all: list[list[int]]
    accepted: list[Tensor]
    rejections: list[Counter[str]]
    directions: Tensor  # (R, d)
    iters: Tensor  # (R,) float64, NaN where not reported
    conv: Tensor
    mem_norm: Tensor
    rel_res: Tensor
    skipped: dict[int, str]

    @classmethod
    def empty(
        cls,
        active: list[int],
        rnd: int,
        updates: Tensor,
        ids_all: list[list[int]],
        accepted: list[Tensor],
        rejections: list[Counter[str]],
        dim: int,
    ) -> _Agg:
        dev, r = updates.device, len(active)

        def nan() -> Tensor:
            return torch.full((r,), float("nan"), dtype=torch.float64, device=dev)

        directions = torch.zeros(r, dim, dtype=torch.float32, device=dev)
        return cls(
            active,
            rnd,
            updates,
            ids_all,
            accepted,
            rejections,
            directions,
            nan(),
            nan(),
            nan(),
            nan(),
            {},
        )


class _Aggregation:
    """FusedGroup's aggregation methods, and the per-run residual memories they keep."""

    # set by FusedGroup.__init__
    device: torch.device
    dim: int
    num_clients: int
    runs: list[_Run]
    memory: dict[int, Tensor]  # per_client: (N, d) rows; mean: (d,)

    def _aggregate(
        self,
        active: list[int],
        rnd: int,
        updates: Tensor,
        ids_all: list[list[int]],
        accepted: list[Tensor],
        rejections: list[Counter[str]],
    ) -> tuple[Tensor, dict[str, Any]]:
        """Directions u_r (R, d) and per-run diagnostics (tensors of shape (R,)).

        Runs with a rejected reply this round, and block runs whose P = γG + M has a row that is
        not finite, take the single-run path (fedbgmd.core on the accepted rows), so every rule
        a single run applies to such rounds applies here.
        """
        a = _Agg.empty(active, rnd, updates, ids_all, accepted, rejections, self.dim)
        all_ok = [bool(x.all()) for x in accepted]
        # omniscient adversaries see the honest accepted rows and rewrite the Byzantine ones
        # (per run), which then meet the replies' checks (RobustStrategy._adversary_rows, as a
        # single run): a rejected row is counted and leaves the run's accepted rows
        for j, i in enumerate(active):
            st = self.runs[i].strategy
            if st.adversary is not None:
                all_ok[j] = self._adversary(st, j, rnd, updates, ids_all, accepted, rejections)
        batched_gm: dict[tuple[Any, ...], list[int]] = {}  # plain GM runs, by GM settings
        alone: list[int] = []
        block_groups: dict[tuple[Any, ...], list[int]] = {}
        for j, i in enumerate(active):
            st = self.runs[i].strategy
            n_acc = int(accepted[j].sum())
            if n_acc < st.min_replies:
                a.skipped[j] = f"{n_acc} accepted replies < min_replies={st.min_replies}"
                continue
            if not all_ok[j]:
                alone.append(j)
            elif st.block:
                key = (
                    block_size(st.beta, self.dim),
                    st.selector,
                    st.memory_kind,
                    None if st.weighted else _gm_settings(st.aggregator),
                    float(st.server_lr),
                )
                block_groups.setdefault(key, []).append(j)
            elif not st.weighted and (settings := _gm_settings(st.aggregator)) is not None:
                batched_gm.setdefault(settings, []).append(j)
            else:
                w = self._weights(i, ids_all[j]) if st.weighted else None
                res = st.aggregator(updates[j], w)
                a.directions[j] = st.server_lr * res.vector
                a.iters[j], a.conv[j] = float(res.iterations), float(res.converged)
        for gm_js in batched_gm.values():  # one batched GM per setting (eps, max_iter, ...)
            js = torch.tensor(gm_js, device=self.device)
            res_many = _gm_many(updates[js], self.runs[active[gm_js[0]]].strategy.aggregator)
            lr_s = torch.tensor(
                [self.runs[active[j]].strategy.server_lr for j in gm_js],
                dtype=torch.float32,
                device=self.device,
            ).unsqueeze(1)
            a.directions[js] = lr_s * res_many.median
            a.iters[js] = res_many.iterations.double()
            a.conv[js] = res_many.converged.double()
        for key, js_list in block_groups.items():
            alone += self._block_step(a, js_list, *key)
        for j in alone:
            self._aggregate_alone(a, j)
        diag = {
            "gm_iterations": a.iters,
            "gm_converged": a.conv,
            "memory_norm": a.mem_norm,
            "relative_residual": a.rel_res,
            "skipped": a.skipped,
        }
        return a.directions, diag

    @staticmethod
    def _adversary(
        st: Any,
        j: int,
        rnd: int,
        updates: Tensor,
        ids_all: list[list[int]],
        accepted: list[Tensor],
        rejections: list[Counter[str]],
    ) -> bool:
        """Run ``j``'s omniscient rows written into ``updates[j]`` (on its accepted rows) and
        validated; ``accepted[j]`` and ``rejections[j]`` updated. Returns: every row accepted."""
        ok = accepted[j]
        if bool(ok.all()):
            updates[j], why = st._adversary_rows(updates[j], ids_all[j], rnd)
            cols = list(range(len(why)))
        else:
            keep = ok.nonzero().squeeze(1)
            if keep.numel() == 0:
                return False
            cols = keep.tolist()
            rows, why = st._adversary_rows(updates[j][keep], [ids_all[j][c] for c in cols], rnd)
            updates[j][keep] = rows
        for c, w in zip(cols, why):
            if w is not None:
                ok[c] = False
                rejections[j][w] += 1
        return bool(ok.all())

    def _weights(self, i: int, ids: list[int]) -> Tensor:
        sizes = [len(self.runs[i].parts[p]) for p in ids]
        return torch.tensor(sizes, dtype=torch.float32, device=self.device)

    def _memory_rows(self, i: int, memory: str) -> Tensor:
        if i not in self.memory:
            shape = (self.num_clients, self.dim) if memory == "per_client" else (self.dim,)
            self.memory[i] = torch.zeros(shape, dtype=torch.float32, device=self.device)
        return self.memory[i]

    def _block_step(
        self,
        a: _Agg,
        js_list: list[int],
        k: int,
        selector: str,
        memory: str,
        gm_settings: tuple[Any, ...] | None,
        lr_s: float,
    ) -> list[int]:
        """FL-BGMD's block step (fedbgmd.core.bgmd_step) for runs sharing k/selector/memory.

        Returns the runs left for the single-run path: those whose P = γG + M has a row that
        is not finite (bgmd_step drops, counts and forgets such rows; see _aggregate_alone).
        """
        from fedbgmd.components import generator
        from fedbgmd.core.selection import select_from_norms

        dev = self.device
        active = a.active
        g = a.updates[torch.tensor(js_list, device=dev)]  # (B, n, d)
        # P = γ_s G + M (a copy: the stored memory changes only at the commit below)
        rows: list[Tensor] = []
        if memory == "per_client":
            rows = [torch.tensor(a.ids_all[j], device=dev) for j in js_list]
            m = torch.stack(
                [self._memory_rows(active[j], memory)[r] for j, r in zip(js_list, rows)]
            )
            p = m.add_(g, alpha=lr_s)
        elif memory == "mean":
            m = torch.stack([self._memory_rows(active[j], memory) for j in js_list])
            p = torch.add(m.unsqueeze(1), g, alpha=lr_s)
        else:
            p = g * lr_s if lr_s != 1.0 else g.clone()
        s = p.square().sum(dim=1)  # (B, d) column squared norms
        total = s.sum(dim=1, dtype=torch.float64)
        left: list[int] = []
        if not bool(torch.isfinite(total).all()):
            rows_ok = torch.isfinite(p).flatten(1).all(dim=1).tolist()
            left = [j for j, ok in zip(js_list, rows_ok) if not ok]
            keep = [b for b, ok in enumerate(rows_ok) if ok]
            if not keep:
                return left
            if left:
                js_list = [js_list[b] for b in keep]
                rows = [rows[b] for b in keep] if rows else rows
                p = p[torch.tensor(keep, device=dev)]
            # finite entries whose squares overflow float32: norms in float64 (as bgmd_step)
            s = p.double().square().sum(dim=1)
            total = s.sum(dim=1)
        js = torch.tensor(js_list, device=dev)
        n_b = len(js_list)
        if k == self.dim:
            sel = torch.arange(self.dim, device=dev).expand(n_b, -1)
        elif selector == "topk":
            sel = torch.topk(s, k, dim=1, sorted=False).indices.sort(dim=1).values
        else:
            sel = torch.stack(
                [
                    select_from_norms(
                        s[b],
                        k,
                        selector,
                        generator(self.runs[active[j]].seed, a.rnd, "block", device=dev),
                    )
                    for b, j in enumerate(js_list)
                ]
            )
        kept = s.gather(1, sel).sum(dim=1, dtype=torch.float64)
        resid = (total - kept).clamp_min(0.0)
        rel = torch.where(total > 0, resid / total, torch.zeros_like(total))
        n = p.shape[1]
        delta = p.gather(2, sel.unsqueeze(1).expand(-1, n, -1))  # (B, n, k)
        if gm_settings is not None:  # one GM setting per block group (the key)
            res = _gm_many(delta, self.runs[active[js_list[0]]].strategy.aggregator)
            vec_k, it, cv = res.median, res.iterations.double(), res.converged.double()
        else:
            outs, it_l, cv_l, refused = [], [], [], []
            for b, j in enumerate(js_list):
                st = self.runs[active[j]].strategy
                w = self._weights(active[j], a.ids_all[j]) if st.weighted else None
                try:
                    r = st.aggregator(delta[b], w)
                except AggregationRefused:  # Krum with too few rows...: the single-run path decides
                    refused.append(b)
                    outs.append(torch.zeros(k, dtype=delta.dtype, device=dev))
                    it_l.append(float("nan"))
                    cv_l.append(float("nan"))
                    continue
                outs.append(r.vector)
                it_l.append(float(r.iterations))
                cv_l.append(float(r.converged))
            if refused:  # nothing of this step is stored for them: redo them alone
                keep = [b for b in range(n_b) if b not in refused]
                left += [js_list[b] for b in refused]
                if not keep:
                    return left
                kt = torch.tensor(keep, device=dev)
                js_list = [js_list[b] for b in keep]
                rows = [rows[b] for b in keep] if rows else rows
                p, sel, rel = p[kt], sel[kt], rel[kt]
                outs = [outs[b] for b in keep]
                it_l = [it_l[b] for b in keep]
                cv_l = [cv_l[b] for b in keep]
                js, n_b = torch.tensor(js_list, device=dev), len(js_list)
            vec_k = torch.stack(outs)
            it = torch.tensor(it_l, dtype=torch.float64, device=dev)
            cv = torch.tensor(cv_l, dtype=torch.float64, device=dev)
        vec = torch.zeros(n_b, self.dim, dtype=vec_k.dtype, device=dev)
        vec.scatter_(1, sel, vec_k)
        # M_{t+1} = P − C_k(P)
        p.scatter_(2, sel.unsqueeze(1).expand(-1, n, -1), 0.0)
        norms = torch.zeros(n_b, dtype=torch.float64, device=dev)
        for b, j in enumerate(js_list):
            i = active[j]
            if memory == "per_client":
                store = self._memory_rows(i, memory)
                store[rows[b]] = p[b]
                norms[b] = torch.linalg.vector_norm(store, dtype=torch.float64)
            elif memory == "mean":
                self.memory[i] = p[b].mean(dim=0)
                norms[b] = torch.linalg.vector_norm(self.memory[i], dtype=torch.float64)
        a.directions[js] = vec.float()
        a.iters[js], a.conv[js] = it, cv
        a.rel_res[js] = rel
        a.mem_norm[js] = norms
        return left

    def _aggregate_alone(self, a: _Agg, j: int) -> None:
        """Run ``j`` this round through the single-run code on its accepted rows (rejected
        replies, or a block step whose P = γG + M overflowed)."""
        from fedbgmd.components import generator
        from fedbgmd.core import bgmd_step

        i = a.active[j]
        st = self.runs[i].strategy
        keep = a.accepted[j].nonzero().squeeze(1)
        rows = a.updates[j][keep]
        ids = [a.ids_all[j][c] for c in keep.tolist()]
        w = self._weights(i, ids) if st.weighted else None  # (omniscient rows: in _aggregate)
        try:
            if not st.block:
                res = st.aggregator(rows, w)
                a.directions[j] = st.server_lr * res.vector
                a.iters[j], a.conv[j] = float(res.iterations), float(res.converged)
                return
            mem = make_memory(st.memory_kind, dim=self.dim, device=self.device)
            if st.memory_kind == "per_client":
                store = self._memory_rows(i, st.memory_kind)
                mem.load_state_dict(
                    {
                        "kind": "per_client",
                        "dim": self.dim,
                        "client_ids": list(range(self.num_clients)),
                        "rows": store,
                    }
                )
            elif st.memory_kind == "mean":
                mem.load_state_dict(
                    {"kind": "mean", "dim": self.dim, "m": self._memory_rows(i, "mean")}
                )
            step = bgmd_step(
                rows,
                aggregator=st.aggregator,
                k=block_size(st.beta, self.dim),
                memory=mem,
                client_ids=ids,
                step_size=st.server_lr,
                selector=st.selector,
                generator=generator(self.runs[i].seed, a.rnd, "block", device=self.device),
                weights=w,
            )
        except AggregationRefused as err:  # Krum with too few rows...: the round is skipped
            a.skipped[j] = f"aggregation refused: {err}"
            self._store_memory(i, st.memory_kind, mem if st.block else None)
            return
        self._store_memory(i, st.memory_kind, mem)
        if step.overflowed:  # as RobustStrategy: rejected, not aggregated
            a.rejections[j]["memory_overflow"] += len(step.overflowed)
        a.directions[j] = step.vector
        a.iters[j] = float(step.aggregation.iterations)
        a.conv[j] = float(step.aggregation.converged)
        a.mem_norm[j], a.rel_res[j] = float(step.memory_norm), float(step.relative_residual)

    def _store_memory(self, i: int, kind: str, mem: Any) -> None:
        """Copy a core Memory's state back into the group's stacked memory of run ``i``."""
        if mem is None or kind == "none":
            return
        state = mem.state_dict()
        if kind == "per_client":
            order = torch.tensor(state["client_ids"], device=self.device, dtype=torch.int64)
            self._memory_rows(i, kind)[order] = state["rows"].to(self.device)
        else:
            self.memory[i] = state["m"].to(self.device)


def _gm_settings(agg: Any) -> tuple[Any, ...] | None:
    """The settings a batched GM must share (None: not a GM the batched solver serves). Runs
    are batched only with runs of equal settings: one run's max_iter must not be another's."""
    if not (isinstance(agg, GeometricMedian) and agg.solver in ("auto", "gram")):
        return None
    return (agg.eps, agg.max_iter, agg.nu, agg.init, agg.solver, agg.check_every)


def _gm_many(x: Tensor, agg: GeometricMedian) -> Any:
    """Batched GM of (B, n, k) with ``agg``'s parameters; the direct solver where the Gram
    path cannot serve (auto picks direct when k < 4n; non-finite Gram)."""
    _, n, k = x.shape
    if agg.solver == "auto" and k < 4 * n:
        return _gm_direct_each(x, agg)
    res = batched_geometric_median(x, eps=agg.eps, max_iter=agg.max_iter, nu=agg.nu)
    bad = (~res.gram_ok).nonzero().squeeze(1).tolist()
    if bad:
        alone = _gm_direct_each(x[bad], agg, solver="direct")
        med = res.median.clone()
        med[bad] = alone.median
        iters, conv = res.iterations.clone(), res.converged.clone()
        iters[bad], conv[bad] = alone.iterations, alone.converged
        return dataclasses.replace(res, median=med, iterations=iters, converged=conv)
    return res


@dataclasses.dataclass
class _Many:
    median: Tensor
    iterations: Tensor
    converged: Tensor


def _gm_direct_each(x: Tensor, agg: GeometricMedian, solver: str | None = None) -> _Many:
    meds, its, cvs = [], [], []
    for b in range(x.shape[0]):
        r = geometric_median(
            x[b],
            eps=agg.eps,
            max_iter=agg.max_iter,
            nu=agg.nu,
            init=agg.init,
            solver=solver or agg.solver,
            check_every=agg.check_every,
        )
        meds.append(r.median)
        its.append(r.iterations)
        cvs.append(r.converged)
    dev = x.device
    return _Many(torch.stack(meds), torch.tensor(its, device=dev), torch.tensor(cvs, device=dev))
