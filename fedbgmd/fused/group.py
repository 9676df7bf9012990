"""A fused group: the stacked runs and their round (batches, the clients' nested vmap, update
attacks, the replies' checks, the server step, evaluation and each job's rows); the
aggregation is :mod:`fedbgmd.fused.aggregate`'s, the planning :mod:`fedbgmd.fused.planner`'s."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedbgmd.core import flatten_state
from fedbgmd.fused.aggregate import _Aggregation
from fedbgmd.fused.grouping import Unfusable
from fedbgmd.fused.planner import _Planner
from fedbgmd.fused.runs import _Bookkeeping, _Run
from fedbgmd.seeding import derive_seed
from fedbgmd.strategies.validation import median_of_claims

log = logging.getLogger("fedbgmd")

EVAL_RUNS = 16  # runs evaluated per vmapped pass
GRAD_RUNS = 48  # runs whose clients' gradients are taken per vmapped pass


class FusedGroup(_Aggregation):
    """Runs the jobs ``[(cfg, run_dir), ...]`` of one lockstep group to completion.

    Each job writes its usual run folder. ``workers`` > 0 plans the rounds' mini-batches and
    data-attack batches in that many forked processes ahead of the device (the per-client
    generators are CPU work; on a GPU they would otherwise dominate); 0 plans inline.
    """

    def __init__(self, jobs: Sequence[tuple[Any, Path]], workers: int | None = 0) -> None:
        from fedbgmd.models import build_model, count_parameters
        from fedbgmd.reporting.summary import environment_versions
        from fedbgmd.server import rounds_per_epoch, write_partition_report
        from fedbgmd.training import get_device
        from fedbgmd.workload import load_data, model_kwargs, partitions

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
        self.dataset = load_data(cfg0.data, cfg0.seed)
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
            **model_kwargs(cfg0.model),
        ).to(self.device)
        self.keys = [k for k, _ in self.model.named_parameters()]
        self.shapes = {k: p.shape for k, p in self.model.named_parameters()}
        self.numels = {k: p.numel() for k, p in self.model.named_parameters()}
        self.dim = sum(self.numels.values())
        parts = [  # once a job
            partitions(cfg.data, cfg.num_clients, cfg.seed, self.dataset.train.y)
            for cfg, _ in self.jobs
        ]
        self._check_fusable(parts)
        self.runs: list[_Run] = []
        xs = []
        # taken once, now: the code that runs is the code imported at the start
        versions = environment_versions(str(self.device))
        n_params = count_parameters(self.model)
        for (cfg, run_dir), job_parts in zip(self.jobs, parts):
            server = _Bookkeeping(cfg, Path(run_dir), job_parts, self.device, self.rpe, versions)
            write_partition_report(cfg, Path(run_dir), job_parts, self.dataset)
            server.num_parameters = n_params
            model = build_model(
                cfg.model.name,
                self.dataset.num_classes,
                self.dataset.input_shape,
                seed=cfg.seed,
                **model_kwargs(cfg.model),
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
            if j in diag["skipped"]:  # as a single run: a skipped round reports no train loss
                d["skipped"] = diag["skipped"][j]
                d["train_loss"] = None
                if n_acc == 0 and rejections[j].keys() & {"non_finite", "bad_metrics"}:
                    d["check_model"] = True  # every reply non-finite: the model is evaluated
            if not finite_h[j]:
                msg = f"round {rnd}: the global model has NaN/Inf parameters"
                run.strategy.diverged = run.strategy.diverged or msg
                d["diverged"] = True
        return info

    # ------------------------------------------------------------------ clients
    def _param_views(self, x: Tensor) -> dict[str, Tensor]:
        """The flat models ``x`` (R, d) as the model's parameters, views of shape (R, *shape)."""
        params: dict[str, Tensor] = {}
        off = 0
        for k in self.keys:
            params[k] = x[:, off : off + self.numels[k]].view(len(x), *self.shapes[k])
            off += self.numels[k]
        return params

    def _client_updates(
        self, idx: list[int], xb: Tensor, yb: Tensor, lrs: list[float], rnd: int
    ) -> tuple[Tensor, Tensor]:
        """(R, n, d) updates x_r − y_i and (R, n) losses for one SGD step per client."""
        runs = [self.runs[i] for i in idx]
        params = self._param_views(self.x if idx == list(range(len(self.runs))) else self.x[idx])
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
        with _mode(model, training=True):
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
        return out, losses

    def _update_attacks(self, i: int, rnd: int, ids: list[int], rows: Tensor, lr: float) -> None:
        from fedbgmd.attacks.base import call_corrupt_update
        from fedbgmd.seeding import generator

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

        def logits(p: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(model, p, (xb,))

        f = vmap(logits, in_dims=(0, None))
        loss = torch.zeros(len(which), dtype=torch.float64, device=self.device)
        correct = torch.zeros(len(which), dtype=torch.int64, device=self.device)
        n = len(self.test)
        with _mode(model, training=False):
            for lo in range(0, len(which), EVAL_RUNS):
                chunk = which[lo : lo + EVAL_RUNS]
                params = self._param_views(self.x[chunk])
                for s in range(0, n, self.eval_batch):
                    xb = self.test.x[s : s + self.eval_batch]
                    yb = self.test.y[s : s + self.eval_batch]
                    out = f(params, xb)  # (runs, b, C)
                    ce = F.cross_entropy(out.flatten(0, 1), yb.repeat(len(chunk)), reduction="none")
                    loss[lo : lo + len(chunk)] += ce.view(len(chunk), -1).sum(dim=1)
                    correct[lo : lo + len(chunk)] += (out.argmax(2) == yb).sum(dim=1)
        lh, ch = loss.tolist(), correct.tolist()
        return {i: (lh[j] / n, ch[j] / n) for j, i in enumerate(which)}


# ----------------------------------------------------------------------------- helpers
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def _mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """``model`` in training or evaluation mode for the block; each module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
