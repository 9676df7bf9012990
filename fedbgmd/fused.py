"""Fused sweeps: many runs of one sweep advanced in lockstep as one batched computation.

Why: one run of the seed's setup (32 clients x batch 16, a 1.16M-parameter CNN, H = 1) leaves a
GPU nearly idle; a corruption sweep is dozens of such runs. Here the runs that can advance
together (same data, model, clients, rounds and client optimiser; free to differ in strategy,
aggregator, block step, attack, fraction, seed and the client's SGD settings: learning rate and
its schedule, momentum, weight decay) share every round:

* models, momentum buffers and residual memories are stacked along a leading run axis R;
* all runs' clients compute their gradient in one nested ``vmap`` (runs x clients) of
  ``grad(loss ∘ functional_call)``: with H = 1 every client of run r starts from x_r, so this is
  per-client gradients of one model per run;
* GM (full, or on the BGMD block) runs as one batched Gram-space Weiszfeld over all runs
  (:func:`fedbgmd.core.batched_geometric_median`); the BGMD block step (column norms, top-k,
  memory) is batched over the runs that share its block size, selector and memory;
* other aggregators, update and omniscient attacks are called per run on views, through the same
  plug-in objects as a single run; one host read per round collects every run's diagnostics;
* evaluation of all runs is one batched forward pass per test chunk.

What each job keeps from its single run (same seeds, same derivation from (seed, round, client)):
client sampling, the Byzantine set, partitions, every client's mini-batch indices, data-attack
batches (the attack's own ``corrupt_batch`` with the client's generator), update-attack noise,
block selection randomness, the omniscient adversary's generator, the learning-rate schedule,
model initialisation, reply validation (non-finite or over-norm rows rejected with their reason,
the round then handled through the single-run core functions), divergence handling and the run
folder (config.yaml, metrics.csv, metrics.jsonl, summary.json, plots). What differs: dropout masks
(drawn for the whole group; the batched in-process engine's also differ from the per-client loop,
see :mod:`fedbgmd.batched`) and float rounding of batched kernels. tests/test_fused.py compares
fused jobs with the same jobs run alone, with the tolerance and its reason.

Not fused (the job runs alone on its configured engine, and the log says why): a custom
strategy class, local_steps != 1 or local epochs, a non-SGD client optimiser, quantized
messages, message attacks, non-omniscient attacks that train extra local updates (ALIE/IPM),
models with buffers (BatchNorm), the deployment engine, resume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedbgmd.components import derive_seed
from fedbgmd.core import (
    AggregationRefused,
    block_size,
    flatten_state,
    geometric_median,
    make_memory,
)
from fedbgmd.core.agg_gm import GeometricMedian
from fedbgmd.core.batched_gm import batched_geometric_median
from fedbgmd.strategies.robust import median_of_claims

log = logging.getLogger("fedbgmd")

FLUSH_EVERY = 200  # rounds between writes of a job's buffered metrics rows
EVAL_RUNS = 16  # runs evaluated per vmapped pass
GRAD_RUNS = 48  # runs whose clients' gradients are taken per vmapped pass
# non-omniscient attacks that ask the client for extra honest updates (sample_updates)
_NEEDS_SAMPLES = frozenset({"alie", "ipm"})

__all__ = ["FusedGroup", "fuse_reason", "group_key", "plan_groups", "run_jobs"]


# ----------------------------------------------------------------------------- grouping
def fuse_reason(cfg: Any) -> str | None:
    """Why ``cfg`` cannot be fused (None: it can)."""
    c = cfg.client
    if cfg.engine.name == "deployment":
        return "the deployment engine runs real SuperNodes"
    if cfg.resume:
        return "resume continues a single run from its checkpoint"
    from fedbgmd.results import BUILTIN_STRATEGY_TARGETS

    if cfg.strategy.target not in BUILTIN_STRATEGY_TARGETS:
        return f"custom strategy class {cfg.strategy.target}"
    if c.local_epochs is not None or c.local_steps != 1:
        return "only local_steps=1 is fused (H > 1 or local epochs run alone)"
    if c.optimizer.name != "sgd":
        return f"client optimizer {c.optimizer.name!r} (only sgd is fused)"
    if c.quantization.method != "none":
        return f"quantized messages ({c.quantization.method})"
    a = cfg.attack
    if a.mode != "omniscient" and a.name in _NEEDS_SAMPLES and a.target is None:
        return f"attack {a.name!r} trains extra local updates on the client"
    if a.target is None and a.name != "none" and a.mode != "omniscient":
        from fedbgmd.attacks import get_attack

        if get_attack(a.name, **dict(a.params)).kind == "message":
            return f"message attack {a.name!r} (acts on serialised arrays)"
    if cfg.model.name == "resnet18":
        return "models with buffers (BatchNorm running statistics)"
    return None


def group_key(cfg: Any) -> str:
    """Jobs with equal keys can advance in lockstep (see the module docstring)."""
    from omegaconf import OmegaConf

    from fedbgmd.config import clients_per_round

    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    client = dict(c["client"])
    # the client optimiser (SGD, see fuse_reason) is per run: lr, schedule, momentum, decay
    client.pop("optimizer")
    data = dict(c["data"])
    # partitions are per run; the data itself depends on the seed only when it is generated
    data_seed = c["seed"] if data["name"] == "synthetic" else None
    key = {
        "data": data,
        "data_seed": data_seed,
        "model": c["model"],
        "client": client,
        "num_clients": c["num_clients"],
        "clients_per_round": clients_per_round(cfg),
        "num_rounds": c["num_rounds"],
        "device": c["device"],
        "eval": (c["eval_every"], c["eval_batch_size"], c["max_eval_samples"]),
    }
    return repr(sorted(key.items()))


def plan_groups(cfgs: Sequence[Any]) -> tuple[list[list[int]], dict[int, str]]:
    """(groups of job indices that fuse, {job index: reason} for the jobs that run alone)."""
    alone: dict[int, str] = {}
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = fuse_reason(cfg)
        if reason is not None:
            alone[i] = reason
            continue
        groups.setdefault(group_key(cfg), []).append(i)
    return list(groups.values()), alone


# ----------------------------------------------------------------------------- one run's state
@dataclasses.dataclass
class _Run:
    """The per-run pieces of a fused group (everything that is not a stacked tensor)."""

    cfg: Any
    server: _Bookkeeping  # the run folder, the attack and the strategy object
    parts: list[Tensor]
    seed: int = 0
    sgd: tuple[float, bool, float] = (0.0, False, 0.0)  # client momentum, nesterov, weight decay
    active: bool = True

    @property
    def run_dir(self) -> Path:
        return self.server.run_dir

    @property
    def strategy(self) -> Any:
        return self.server.strategy

    @functools.cached_property  # read per client and round: built once
    def byz(self) -> frozenset[int]:
        return frozenset(self.server.attack.byzantine_ids)

    @property
    def client_attack(self) -> Any:
        return self.server.attack.client_attack


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


class Unfusable(ValueError):
    """Some jobs of a group turned out not to fuse once the data and model were built.

    ``reasons`` maps their positions in the group to why; the rest of the group can go on.
    """

    def __init__(self, reasons: dict[int, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"job {k}: {v}" for k, v in sorted(reasons.items())))


class FusedGroup:
    """Runs the jobs ``[(cfg, run_dir), ...]`` of one lockstep group to completion.

    Each job writes its usual run folder. ``workers`` > 0 plans the rounds' mini-batches and
    data-attack batches in that many forked processes ahead of the device (the per-client
    generators are CPU work; on a GPU they would otherwise dominate); 0 plans inline.
    """

    def __init__(self, jobs: Sequence[tuple[Any, Path]], workers: int | None = 0) -> None:
        from fedbgmd.components import load_data, model_kwargs, partitions
        from fedbgmd.models import build_model, count_parameters
        from fedbgmd.results import environment_versions
        from fedbgmd.server import rounds_per_epoch
        from fedbgmd.training import get_device

        if not jobs:
            raise ValueError("FusedGroup needs at least one job")
        self.jobs = list(jobs)
        cfg0 = self.jobs[0][0]
        self.device = get_device(cfg0.device)
        self.num_rounds = int(cfg0.num_rounds)
        self.num_clients = int(cfg0.num_clients)
        self.batch_size = int(cfg0.client.batch_size)
        if workers is None:
            cpus = os.cpu_count() or 1
            workers = min(16, max(0, cpus - 2)) if self.device.type == "cuda" else 0
        self.workers = int(workers)
        self.dataset = load_data(cfg0)
        self.rpe = rounds_per_epoch(cfg0, len(self.dataset.train))
        self.train_x = self.dataset.train.x.to(self.device)
        self.train_y = self.dataset.train.y.to(self.device)
        test = self.dataset.test
        if cfg0.max_eval_samples is not None:
            test = test.subset(torch.arange(min(len(test), cfg0.max_eval_samples)))
        self.test = test.to(self.device)
        self.eval_every = int(cfg0.eval_every)
        self.eval_batch = int(cfg0.eval_batch_size)
        self.model = build_model(
            cfg0.model.name,
            self.dataset.num_classes,
            self.dataset.input_shape,
            **model_kwargs(cfg0),
        ).to(self.device)
        self.keys = [k for k, _ in self.model.named_parameters()]
        self.shapes = {k: p.shape for k, p in self.model.named_parameters()}
        self.numels = {k: p.numel() for k, p in self.model.named_parameters()}
        self.dim = sum(self.numels.values())
        parts = [partitions(cfg, self.dataset.train.y) for cfg, _ in self.jobs]  # once a job
        self._check_fusable(parts)
        self.runs: list[_Run] = []
        xs = []
        # taken once, now: the code that runs is the code imported at the start
        versions = environment_versions(str(self.device))
        n_params = count_parameters(self.model)
        for (cfg, run_dir), job_parts in zip(self.jobs, parts):
            server = _Bookkeeping(cfg, Path(run_dir), job_parts, self.device, self.rpe, versions)
            server.num_parameters = n_params
            model = build_model(
                cfg.model.name,
                self.dataset.num_classes,
                self.dataset.input_shape,
                seed=cfg.seed,
                **model_kwargs(cfg),
            )
            flat, _ = flatten_state(model.state_dict())
            xs.append(flat.to(self.device, torch.float32))
            self.runs.append(
                _Run(
                    cfg=cfg,
                    server=server,
                    parts=job_parts,
                    seed=int(cfg.seed),
                    sgd=(
                        float(cfg.client.optimizer.momentum),
                        bool(cfg.client.optimizer.nesterov),
                        float(cfg.client.optimizer.weight_decay),
                    ),
                )
            )
        self.x = torch.stack(xs)  # (R, d) global models
        self.momentum: Tensor | None = None
        strategies = [r.strategy for r in self.runs]
        self._server_mu = torch.tensor(
            [[float(st.momentum)] for st in strategies], dtype=torch.float32, device=self.device
        )
        self._server_nesterov = torch.tensor(
            [[bool(st.nesterov)] for st in strategies], dtype=torch.bool, device=self.device
        )
        self.memory: dict[int, Tensor] = {}  # per_client: (N, d) rows; mean: (d,)

    def _check_fusable(self, parts: list[list[Tensor]]) -> None:
        """Raise Unfusable for jobs the batched round cannot serve (before any folder is made)."""
        if list(self.model.buffers()) or list(self.model.state_dict()) != self.keys:
            raise Unfusable(
                dict.fromkeys(range(len(self.jobs)), "a model with buffers or tied weights")
            )
        reasons = {}
        for k, job_parts in enumerate(parts):
            small = min(len(p) for p in job_parts)
            if small < self.batch_size:
                reasons[k] = (
                    f"a client holds {small} samples < batch_size {self.batch_size} (the fused "
                    "round has no padded batches)"
                )
        if reasons:
            raise Unfusable(reasons)

    # ------------------------------------------------------------------ planning (CPU)
    def _plan_state(self) -> dict[str, Any]:
        return {
            "runs": [
                (
                    int(r.cfg.seed),
                    r.parts,
                    r.byz,
                    r.client_attack
                    if r.client_attack is not None and r.client_attack.kind == "data"
                    else None,
                    r.strategy,
                )
                for r in self.runs
            ],
            "batch_size": self.batch_size,
            "train": self.dataset.train,
            "num_classes": self.dataset.num_classes,
        }

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        """All rounds of every job; each job's folder gets its rows and summary."""
        status, error = "completed", None
        threads = self.jobs[0][0].engine.num_threads
        if threads is not None:  # as cli.run: small models lose badly to oversubscription
            torch.set_num_threads(int(threads))
        self.started = time.time()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the shapes repeat every round
        self.timing = dict.fromkeys(("plan", "round", "client", "agg", "log", "rounds"), 0.0)
        planner: _Planner | None = None
        try:
            planner = _Planner(self._plan_state(), self.num_rounds, self.workers, self.device)
            self._evaluate_and_log(0, {})
            for rnd in range(1, self.num_rounds + 1):
                if not any(r.active for r in self.runs):
                    break
                t0 = time.perf_counter()
                plan = planner.get(rnd)
                t1 = time.perf_counter()
                info = self._round(rnd, plan, t0)
                t2 = time.perf_counter()
                self.timing["plan"] += t1 - t0
                self.timing["round"] += t2 - t1
                self.timing["rounds"] += 1
                self._evaluate_and_log(rnd, info)
                self.timing["log"] += time.perf_counter() - t2
        except BaseException as err:
            from fedbgmd.integrity import stop_error, stop_status

            status, error = stop_status(err), stop_error(err)  # as a single run records it
            raise
        finally:
            # the jobs' rows and summaries first: they are what an interrupted sweep keeps
            for r in self.runs:
                if r.active or status != "completed":
                    r.server.finish(status, error)
            if planner is not None:
                planner.close()
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                print(f"fused: peak GPU memory {peak:.1f} GiB", flush=True)

    # ------------------------------------------------------------------ one round
    def _round(self, rnd: int, plan: Any, t0: float) -> dict[int, dict[str, Any]]:
        idx, attacked, sampled = plan
        active = [i for i, r in enumerate(self.runs) if r.active]
        dev = self.device
        info: dict[int, dict[str, Any]] = {i: {"t_start": t0} for i in active}
        lrs = [float(self.runs[i].strategy.client_lr(rnd)) for i in active]
        # batches: gathered on the device, data-attacked clients' batches substituted
        gidx = idx[torch.tensor(active, device=dev)]
        xb = self.train_x[gidx]  # (R, n, b, ...)
        yb = self.train_y[gidx]
        if attacked is not None:
            a_run, a_client, ax, ay = attacked
            pos = torch.full((len(self.runs),), -1, dtype=torch.int64, device=dev)
            pos[torch.tensor(active, device=dev)] = torch.arange(len(active), device=dev)
            where = pos[a_run]
            keep = where >= 0
            xb[where[keep], a_client[keep]] = ax[keep]
            yb[where[keep], a_client[keep]] = ay[keep]
        t_c = time.perf_counter()
        updates, losses = self._client_updates(active, xb, yb, lrs, rnd)
        _sync(dev)
        client_s = time.perf_counter() - t_c
        self.timing["client"] += client_s
        t_a = time.perf_counter()
        ids_all = [sampled[i] for i in active]
        for j, i in enumerate(active):
            self._update_attacks(i, rnd, ids_all[j], updates[j], lrs[j])
        accepted, rejections = self._validate(active, updates, losses)
        directions, diag = self._aggregate(active, rnd, updates, ids_all, accepted, rejections)
        self._server_step(active, directions, diag["skipped"])
        finite = torch.isfinite(self.x).all(dim=1)[torch.tensor(active, device=dev)]
        # one host read for every run's diagnostics
        loss_h, finite_h = losses.double().tolist(), finite.tolist()
        ok_h = [a.tolist() for a in accepted]
        diag_host = {k: v.tolist() for k, v in diag.items() if isinstance(v, Tensor)}
        _sync(dev)
        agg_s = time.perf_counter() - t_a
        self.timing["agg"] += agg_s
        dim, n = self.dim, updates.shape[1]
        for j, i in enumerate(active):
            d = info[i]
            run = self.runs[i]
            n_acc = int(accepted[j].sum()) - rejections[j].get("memory_overflow", 0)
            d.update(
                lr=lrs[j],
                # the single run's rule: the median of the accepted claims (never inf)
                train_loss=median_of_claims([v for v, ok in zip(loss_h[j], ok_h[j]) if ok])
                if n_acc
                else None,
                client_time_s=client_s / len(active),
                agg_time_s=agg_s / len(active),
                bytes_up=n * dim * 4,
                bytes_down=n * dim * 4,
                replies_accepted=n_acc,
                replies_rejected=sum(rejections[j].values()),
                rejections=dict(rejections[j]),
            )
            for k, vals in diag_host.items():
                if vals[j] is not None and not (isinstance(vals[j], float) and math.isnan(vals[j])):
                    d[k] = vals[j]
            if j in diag["skipped"]:
                d["skipped"] = diag["skipped"][j]
            if j in diag["skipped"]:  # as a single run: a skipped round reports no train loss
                d["train_loss"] = None
                if n_acc == 0 and rejections[j].keys() & {"non_finite", "bad_metrics"}:
                    d["check_model"] = True  # every reply non-finite: the model is evaluated
            if not finite_h[j]:
                msg = f"round {rnd}: the global model has NaN/Inf parameters"
                run.strategy.diverged = run.strategy.diverged or msg
                d["diverged"] = True
        return info

    # ------------------------------------------------------------------ clients
    def _client_updates(
        self, idx: list[int], xb: Tensor, yb: Tensor, lrs: list[float], rnd: int
    ) -> tuple[Tensor, Tensor]:
        """(R, n, d) updates x_r − y_i and (R, n) losses for one SGD step per client."""
        runs = [self.runs[i] for i in idx]
        x = self.x if idx == list(range(len(self.runs))) else self.x[idx]
        params: dict[str, Tensor] = {}
        off = 0
        for k in self.keys:
            params[k] = x[:, off : off + self.numels[k]].view(len(runs), *self.shapes[k])
            off += self.numels[k]
        model = self.model

        def loss_fn(p: dict[str, Tensor], xc: Tensor, yc: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (xc,)), yc)

        per_client = vmap(grad_and_value(loss_fn), in_dims=(None, 0, 0), randomness="different")
        per_run = vmap(per_client, in_dims=(0, 0, 0), randomness="different")
        n = xb.shape[1]
        out = torch.empty(len(runs), n, self.dim, dtype=torch.float32, device=self.device)
        losses = torch.empty(len(runs), n, dtype=torch.float32, device=self.device)
        # SGD's first step from a fresh buffer: lr·(g + λx), times (1 + μ) with Nesterov
        coef, decay = [], []
        for r, lr in zip(runs, lrs):
            mu, nesterov, wd = r.sgd
            c = lr * (1.0 + mu) if nesterov else lr
            coef.append(c)
            decay.append(c * wd)
        coef_t = torch.tensor(coef, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        decay_t = torch.tensor(decay, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        modes = [(m, m.training) for m in model.modules()]
        model.train()
        try:
            # by chunks of GRAD_RUNS runs: per-client gradients and activations of 132 runs x 32
            # clients of the CNN at once would hold ~70 GB
            for lo in range(0, len(runs), GRAD_RUNS):
                hi = min(len(runs), lo + GRAD_RUNS)
                chunk = {k: v[lo:hi] for k, v in params.items()}
                seed = derive_seed("fused-dropout", rnd, tuple(r.seed for r in runs[lo:hi]))
                with _seeded(seed, self.device):
                    grads, loss = per_run(chunk, xb[lo:hi], yb[lo:hi])
                losses[lo:hi] = loss.detach()
                off = 0
                for k in self.keys:
                    nk = self.numels[k]
                    view = out[lo:hi, :, off : off + nk]
                    torch.mul(grads[k].reshape(hi - lo, n, nk), coef_t[lo:hi], out=view)
                    if any(decay[lo:hi]):
                        view.add_(decay_t[lo:hi] * chunk[k].reshape(hi - lo, 1, nk))
                    off += nk
                del grads, loss
        finally:
            for m, mode in modes:
                m.training = mode
        return out, losses

    def _update_attacks(self, i: int, rnd: int, ids: list[int], rows: Tensor, lr: float) -> None:
        from fedbgmd.attacks.base import call_corrupt_update
        from fedbgmd.components import generator

        run = self.runs[i]
        attack = run.client_attack
        if attack is None or attack.kind != "update":
            return
        seed = run.seed
        for j, pid in enumerate(ids):
            if pid in run.byz:
                g = generator(seed, rnd, pid, "attack", device=rows.device)
                rows[j] = call_corrupt_update(
                    attack, rows[j].clone(), generator=g, sample_updates=None, lr=lr
                )

    # ------------------------------------------------------------------ validation
    def _validate(
        self, active: list[int], updates: Tensor, losses: Tensor
    ) -> tuple[list[Tensor], list[Counter[str]]]:
        """Accepted rows (R bool tensors) and rejection reasons per run, in the single run's
        order of checks: metrics (a non-finite loss), the update's finiteness, its norm."""
        finite_rows = torch.isfinite(updates).all(dim=2)
        finite_loss = torch.isfinite(losses)
        norms_needed = any(self.runs[i].strategy.max_update_norm is not None for i in active)
        norms = torch.linalg.vector_norm(updates, dim=2) if norms_needed else None
        fr, fl = finite_rows.tolist(), finite_loss.tolist()
        nh = norms.tolist() if norms is not None else None
        accepted, rejections = [], []
        for j, i in enumerate(active):
            bound = self.runs[i].strategy.max_update_norm
            ok: list[bool] = []
            why: Counter[str] = Counter()
            for c in range(updates.shape[1]):
                if not fl[j][c]:
                    why["bad_metrics"] += 1
                    ok.append(False)
                elif not fr[j][c]:
                    why["non_finite"] += 1
                    ok.append(False)
                elif bound is not None and nh is not None and nh[j][c] > bound:
                    why["norm_too_large"] += 1
                    ok.append(False)
                else:
                    ok.append(True)
            accepted.append(torch.tensor(ok, device=updates.device))
            rejections.append(why)
        return accepted, rejections

    # ------------------------------------------------------------------ aggregation
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

    # ------------------------------------------------------------------ server step
    def _server_step(self, active: list[int], directions: Tensor, skipped: dict[int, str]) -> None:
        """x ← x − u, heavy-ball or Nesterov on u (RobustStrategy._server_step), for every run
        that aggregated this round; a skipped run keeps its model and momentum (as alone)."""
        js = [j for j in range(len(active)) if j not in skipped]
        if not js:
            return
        rows = [active[j] for j in js]
        every = rows == list(range(len(self.runs)))  # then in place, no (R, d) copies
        u = directions if len(js) == len(active) else directions[js]
        mu = self._server_mu[rows]
        if self.momentum is None and bool((self._server_mu > 0).any()):
            self.momentum = torch.zeros_like(self.x)
            self._momentum_started = torch.zeros(
                len(self.runs), 1, dtype=torch.bool, device=self.device
            )
        if self.momentum is None:
            step = u
        else:
            old = self.momentum if every else self.momentum[rows]
            started = self._momentum_started[rows]
            buf = torch.where(started, mu * old + u, u)
            nesterov = self._server_nesterov[rows]
            step = torch.where(mu == 0, u, torch.where(nesterov, u + mu * buf, buf))
            if every:
                self.momentum.copy_(buf)
            else:
                self.momentum[rows] = buf
            self._momentum_started[rows] = True
        if every:
            self.x.sub_(step)
        else:
            self.x[rows] = self.x[rows] - step

    # ------------------------------------------------------------------ evaluation and rows
    def _evaluate_and_log(self, rnd: int, info: dict[int, dict[str, Any]]) -> None:
        active = [i for i, r in enumerate(self.runs) if r.active]
        due_all = rnd in (0, self.num_rounds) or rnd % self.eval_every == 0
        due = [
            i
            for i in active
            if due_all or info.get(i, {}).get("diverged") or info.get(i, {}).get("check_model")
        ]
        t0 = time.perf_counter()
        results = self._evaluate(due) if due else {}
        self.timing["eval"] = self.timing.get("eval", 0.0) + time.perf_counter() - t0
        if due_all and results:
            accs = [a for _, a in results.values()]
            t = self.timing
            per = {
                k: 1000 * t[k] / max(1.0, t["rounds"])
                for k in ("plan", "round", "client", "agg", "log")
            }
            print(
                f"fused: round {rnd}/{self.num_rounds}, {len(active)} jobs, elapsed "
                f"{time.time() - self.started:.1f} s, test accuracy mean {sum(accs) / len(accs):.4f}"
                f" min {min(accs):.4f} max {max(accs):.4f}; ms/round: wait for plan "
                f"{per['plan']:.1f}, round {per['round']:.1f} (clients {per['client']:.1f}, "
                f"aggregation {per['agg']:.1f}), rows+eval {per['log']:.1f}; evaluations "
                f"{t.get('eval', 0.0):.1f} s in all",
                flush=True,
            )
        eval_s = (time.perf_counter() - t0) / max(1, len(due))
        for i in active:
            run = self.runs[i]
            d = info.get(i, {})
            loss, acc = results.get(i, (None, None))
            run.server.log(rnd, d, loss, acc, eval_s if i in results else 0.0)
            if run.strategy.diverged is not None and run.cfg.stop_on_divergence:
                log.warning("%s: %s; stopping this job", run.run_dir, run.strategy.diverged)
                run.server.finish("completed", None)
                run.active = False

    @torch.no_grad()
    def _evaluate(self, which: list[int]) -> dict[int, tuple[float, float]]:
        """Test loss and accuracy of the runs ``which`` (as fedbgmd.training.evaluate), by chunks
        of EVAL_RUNS runs: the CNN's activations for 132 runs x 1,024 images would be ~40 GB."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()

        def logits(p: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(model, p, (xb,))

        f = vmap(logits, in_dims=(0, None))
        loss = torch.zeros(len(which), dtype=torch.float64, device=self.device)
        correct = torch.zeros(len(which), dtype=torch.int64, device=self.device)
        n = len(self.test)
        try:
            for lo in range(0, len(which), EVAL_RUNS):
                chunk = which[lo : lo + EVAL_RUNS]
                x = self.x[chunk]
                params: dict[str, Tensor] = {}
                off = 0
                for k in self.keys:
                    params[k] = x[:, off : off + self.numels[k]].view(len(chunk), *self.shapes[k])
                    off += self.numels[k]
                for s in range(0, n, self.eval_batch):
                    xb = self.test.x[s : s + self.eval_batch]
                    yb = self.test.y[s : s + self.eval_batch]
                    out = f(params, xb)  # (runs, b, C)
                    ce = F.cross_entropy(out.flatten(0, 1), yb.repeat(len(chunk)), reduction="none")
                    loss[lo : lo + len(chunk)] += ce.view(len(chunk), -1).sum(dim=1)
                    correct[lo : lo + len(chunk)] += (out.argmax(2) == yb).sum(dim=1)
        finally:
            for m, mode in modes:
                m.training = mode
        lh, ch = loss.tolist(), correct.tolist()
        return {i: (lh[j] / n, ch[j] / n) for j, i in enumerate(which)}


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


# ----------------------------------------------------------------------------- bookkeeping
class _Bookkeeping:
    """A job's run folder and strategy object: rows, summary and plots as a single run writes."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        parts: list[Tensor],
        device: torch.device,
        rpe: float,
        versions: dict[str, str | None],
    ) -> None:
        from fedbgmd.components import build_attack
        from fedbgmd.results import RunWriter
        from fedbgmd.server import build_strategy

        self.cfg = cfg
        self.run_dir = run_dir
        self.started = time.time()
        self.versions = versions
        self.writer = RunWriter(run_dir)
        self.attack = build_attack(cfg)
        self.rpe = rpe
        self.diverged_at: int | None = None
        self.finished = False
        self.progress = bool(cfg.progress)
        self.pending: list[dict[str, Any]] = []
        # the strategy object a single run builds (aggregator, block, memory, momentum, lr)
        self.strategy = build_strategy(cfg, device, self.attack, rpe)
        self.strategy.partition_sizes = [len(p) for p in parts]
        self.num_parameters: int | None = None

    def log(
        self, rnd: int, info: dict[str, Any], loss: float | None, acc: float | None, eval_s: float
    ) -> None:
        from fedbgmd.server import _progress_line, metrics_row

        cfg = self.cfg
        if loss is not None and self.diverged_at is None and not math.isfinite(loss):
            self.diverged_at = rnd
            if self.strategy.diverged is None:
                self.strategy.diverged = f"round {rnd}: the global model's test loss is not finite"
        round_time = time.perf_counter() - info["t_start"] if "t_start" in info else eval_s
        row = metrics_row(
            rnd,
            self.rpe,
            info,
            acc=acc,
            loss=loss,
            round_time=round_time,
            comm=0.0 if rnd else None,  # nothing is serialised
            eval_s=eval_s,
            wall=time.time() - self.started,
        )
        # rows are written in batches: at every evaluation, every FLUSH_EVERY rounds and at the
        # end (an interrupted fused job is re-run from its start anyway, see fused_launcher)
        self.pending.append(row)
        if acc is not None or len(self.pending) >= FLUSH_EVERY:
            self.flush()
        if acc is not None and self.progress:
            print(f"{self.run_dir.name}: " + _progress_line(row, cfg.num_rounds), flush=True)

    def flush(self) -> None:
        self.writer.log_rounds(self.pending)
        self.pending = []

    def finish(self, status: str, error: str | None) -> None:
        from fedbgmd.server import draw_plots, summary_fields

        if self.finished:
            return
        self.finished = True
        self.flush()
        summary = summary_fields(
            self.cfg,
            self.writer.rows(),
            status,
            error,
            byzantine_ids=self.attack.byzantine_ids,
            num_parameters=self.num_parameters,
            diverged_at=self.diverged_at,
            diverged=self.strategy.diverged,
            versions=self.versions,
        )
        summary.update(engine="fused", wall_time_s=time.time() - self.started)
        self.writer.write_summary(summary)
        draw_plots(self.cfg, self.run_dir)


# ----------------------------------------------------------------------------- planning
def _plan_round(state: dict[str, Any], rnd: int) -> tuple[Tensor, Any, list[list[int]]]:
    """Every run's sampled clients, their mini-batch indices (global, (R, n, b)) and the
    data-attacked batches [(run, client position, x, y)], exactly as the single-run clients
    draw them (fedbgmd.clients.honest: generator(seed, round, pid, "batches"/"data", ...))."""
    from fedbgmd.components import generator
    from fedbgmd.training import batch_indices

    b = state["batch_size"]
    train = state["train"]
    out_idx, attacked, sampled = [], [], []  # attacked: (run, client position, x, y)
    for r, (seed, parts, byz, data_attack, strategy) in enumerate(state["runs"]):
        ids = strategy.sample_partitions(rnd)
        sampled.append(ids)
        rows = []
        for c, pid in enumerate(ids):
            part = parts[pid]
            g = generator(seed, rnd, pid, "batches", "honest")
            local = next(batch_indices(len(part), b, 1, None, g))
            gi = part[local]
            if len(gi) < b:  # a client smaller than the batch: not fusable
                raise NotImplementedError(
                    f"partition {pid} holds {len(part)} samples < batch_size {b}"
                )
            rows.append(gi)
            if data_attack is not None and pid in byz:
                gd = generator(seed, rnd, pid, "data", "honest", device="cpu")
                xa, ya = data_attack.corrupt_batch(
                    train.x[gi], train.y[gi], generator=gd, num_classes=state["num_classes"]
                )
                attacked.append((r, c, xa, ya))
        out_idx.append(torch.stack(rows))
    packed = None
    if attacked:  # one tensor each: one host-to-device copy per round
        packed = (
            torch.tensor([a[0] for a in attacked]),
            torch.tensor([a[1] for a in attacked]),
            torch.stack([a[2] for a in attacked]),
            torch.stack([a[3] for a in attacked]),
        )
    return torch.stack(out_idx), packed, sampled


def _plan_into_slot(
    state: dict[str, Any], bufs: dict[str, Tensor], rnd: int, slot: int
) -> tuple[list[list[int]], int]:
    """Plan ``rnd`` into the shared slot; return the small parts (sampled ids, attacked count)."""
    idx, attacked, sampled = _plan_round(state, rnd)
    bufs["idx"][slot].copy_(idx)
    count = 0
    if attacked is not None:
        count = len(attacked[0])
        for name, t in zip(("run", "client", "x", "y"), attacked):
            bufs[name][slot, :count].copy_(t)
    return sampled, count


def _planner_worker(conn: Any, state: dict[str, Any], bufs: dict[str, Tensor]) -> None:
    """A forked planner: (round, slot) in, (round, sampled, count) or an error out, one pipe.

    It ignores SIGINT: a Ctrl-C reaches the whole process group, and the main process, which
    handles it and writes every job's summary, then kills its planners itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        rnd, slot = task
        try:
            conn.send((rnd, *_plan_into_slot(state, bufs, rnd, slot)))
        except Exception as err:
            conn.send((rnd, err, None))


class _Planner:
    """Rounds' plans on ``device``, computed inline or by forked workers working ahead.

    Workers write into shared-memory slots (mini-batch indices and the data-attacked batches:
    tens of MB a round for a full Table 2 sweep, too much to pickle) and return only the sampled
    client ids. Round r goes to worker (r − 1) mod W through that worker's own pipe (no lock is
    shared, so killing a worker can never leave one held: multiprocessing.Pool's shared task
    queue could, and its shutdown then hung); at most DEPTH rounds per worker are in flight, so
    a slot is rewritten only after the device copy of the round it held.
    """

    DEPTH = 2

    def __init__(
        self, state: dict[str, Any], num_rounds: int, workers: int, device: torch.device
    ) -> None:
        self.state, self.num_rounds, self.device = state, num_rounds, device
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        if workers <= 0 or "fork" not in mp.get_all_start_methods():
            return
        runs = state["runs"]
        n = max(1, len(runs[0][4].sample_partitions(1)))
        b = state["batch_size"]
        shape = tuple(state["train"].x.shape[1:])
        attacked_max = sum(len(byz) for _, _, byz, attack, _ in runs if attack is not None)
        self.slots = workers * self.DEPTH
        k, a = self.slots, max(1, attacked_max)
        self.bufs = {
            "idx": torch.zeros(k, len(runs), n, b, dtype=torch.int64).share_memory_(),
            "run": torch.zeros(k, a, dtype=torch.int64).share_memory_(),
            "client": torch.zeros(k, a, dtype=torch.int64).share_memory_(),
            "x": torch.zeros(k, a, b, *shape, dtype=state["train"].x.dtype).share_memory_(),
            "y": torch.zeros(k, a, b, dtype=state["train"].y.dtype).share_memory_(),
        }
        ctx = mp.get_context("fork")
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_planner_worker, args=(there, state, self.bufs), daemon=True)
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)
        for rnd in range(1, min(num_rounds, self.slots) + 1):
            self._submit(rnd)

    def _conn(self, rnd: int) -> Any:
        return self.conns[(rnd - 1) % len(self.conns)]

    def _submit(self, rnd: int) -> None:
        self._conn(rnd).send((rnd, (rnd - 1) % self.slots))

    def get(self, rnd: int) -> tuple[Tensor, Any, list[list[int]]]:
        dev = self.device
        if not self.procs:
            idx, attacked, sampled = _plan_round(self.state, rnd)
            if attacked is not None:
                attacked = tuple(t.to(dev) for t in attacked)
            return idx.to(dev), attacked, sampled
        try:
            got, sampled, count = self._conn(rnd).recv()  # a worker's rounds come in order
        except EOFError as err:
            raise RuntimeError(f"the planner process for round {rnd} died") from err
        if isinstance(sampled, Exception):
            raise sampled
        assert got == rnd, (got, rnd)
        slot = (rnd - 1) % self.slots
        idx = self.bufs["idx"][slot].to(dev)
        attacked = None
        if count:
            attacked = tuple(
                self.bufs[k][slot, :count].to(dev) for k in ("run", "client", "x", "y")
            )
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the slot is read before reuse
        if rnd + self.slots <= self.num_rounds:
            self._submit(rnd + self.slots)
        return idx, attacked, sampled

    def close(self) -> None:
        """Stop the workers at once (SIGKILL: they hold nothing the main process needs)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc, conn in zip(self.procs, self.conns):
            proc.join(timeout=10)
            conn.close()
        self.procs, self.conns = [], []


# ----------------------------------------------------------------------------- helpers
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _seeded:
    """Fork the global RNG (CPU and the CUDA device) and seed it: dropout masks of the group."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self._ctx: Any = None

    def __enter__(self) -> None:
        devices = []
        if self.device.type == "cuda":
            devices = [
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            ]
        self._ctx = torch.random.fork_rng(devices=devices)
        self._ctx.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------- entry
def set_aside_partial(run_dir: Path) -> None:
    """Move an unfinished run's files aside (``<name>.interrupted``) so a new run starts clean."""
    for name in ("metrics.csv", "metrics.jsonl", "summary.json"):
        p = run_dir / name
        if p.exists():
            p.replace(run_dir / f"{name}.interrupted")
            log.warning("%s: an unfinished run's %s moved to %s.interrupted", run_dir, name, name)


def run_jobs(
    jobs: Sequence[tuple[Any, Path]], workers: int | None = None, on_group_failure: str = "alone"
) -> dict[int, int]:
    """Run ``jobs`` [(cfg, run_dir)]: fusable ones in lockstep groups, the rest alone.

    ``workers``: planning processes per group (None: the CPUs but two when the group runs on a
    GPU, at most 16; 0 on a CPU device, where they would compete with the computation).
    ``on_group_failure``: "alone" runs a failed group's jobs alone (nothing lost, at the cost
    of their full length one by one); "fail" records them as failed and leaves their folders as
    the group left them (what a time-boxed GPU run wants).
    Returns {job index: exit status} (0 done, 1 failed), as the CLI reports a single run.
    """
    if on_group_failure not in ("alone", "fail"):
        raise ValueError(f"on_group_failure must be 'alone' or 'fail', got {on_group_failure!r}")
    from fedbgmd.cli import run as run_alone

    cfgs = [c for c, _ in jobs]
    groups, alone = plan_groups(cfgs)
    status: dict[int, int] = {}
    for i, reason in alone.items():
        log.warning("job %s runs alone: %s", jobs[i][1], reason)
    for group in groups:
        members = [(jobs[i][0], Path(jobs[i][1])) for i in group]
        log.warning("fusing %d jobs into one computation", len(members))
        for cfg, run_dir in members:
            from omegaconf import OmegaConf

            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            fused = None
            while fused is None and group:
                try:
                    fused = FusedGroup(members, workers=workers)
                except Unfusable as err:
                    for k, reason in err.reasons.items():
                        log.warning("job %s runs alone: %s", members[k][1], reason)
                        alone[group[k]] = reason
                    group = [i for k, i in enumerate(group) if k not in err.reasons]
                    members = [m for k, m in enumerate(members) if k not in err.reasons]
            if fused is not None:
                fused.run()
            for i in group:
                status[i] = 0
        except Exception as err:
            # a fault of the fused engine must not cost the sweep its jobs: each runs alone
            log.exception(
                "fused group of %d jobs failed (%s: %s); running its jobs alone",
                len(group),
                type(err).__name__,
                err,
            )
            for i in group:
                if on_group_failure == "fail":
                    status[i] = 1
                    continue
                set_aside_partial(Path(jobs[i][1]))
                alone[i] = "its fused group failed"
    for i in alone:
        status[i] = run_alone(jobs[i][0], Path(jobs[i][1]))
    return status
