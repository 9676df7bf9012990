"""RobustStrategy: one Flower strategy for every aggregator, optionally inside the BGMD block step.

Each round (Flower Message API, ``flwr.serverapp.strategy.Strategy``):

1. ``configure_train`` samples ``clients_per_round`` partitions with a generator seeded by
   (seed, round) and sends them the global model x_t and the round's learning rate.
2. ``aggregate_train`` orders the replies by partition id, validates each one (wire format,
   dtype, shape, size, finiteness, optional norm bound; rejected replies are counted by reason),
   stacks the accepted updates G_t ∈ R^{n×d} on the server device, lets the omniscient adversary
   (simulation only) replace the Byzantine rows, and computes the direction u_t:

   - plain:  u_t = γ_s · AGG(G_t)
   - block:  P_t = γ_s G_t + M_t,  Δ_t = C_k(P_t),  M_{t+1} = P_t − Δ_t,  u_t = AGG(Δ_t restricted
     to I_k) scattered into R^d (FL-BGMD, Algorithm 3; AGG = GM gives BGMD, CM a block CM).

   then x_{t+1} = x_t − u_t (or a heavy-ball / Nesterov step on u_t when server_momentum > 0).

With fewer than ``min_replies`` accepted replies the round is skipped (x, memory unchanged) and
the reason is logged. Per-round diagnostics are kept in :attr:`round_info`.

Plug-in contract for a custom strategy: subclass and override :meth:`aggregate_updates`, which
receives the validated (n, d) tensor, the partition ids of its rows and the round, and returns
the direction u_t (d,) plus a dict of float diagnostics. Everything else (sampling, validation,
memory, momentum, logging) is inherited.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedbgmd.attacks.base import OmniscientAttack
from fedbgmd.core import (
    AggregationRefused,
    AggregationResult,
    Aggregator,
    FlatSpec,
    all_finite,
    all_finite_each,
    bgmd_step,
    block_size,
    flatten_state,
    make_memory,
    stack_rows,
    unflatten_state,
)
from fedbgmd.plugins import PluginFailed
from fedbgmd.seeding import generator
from fedbgmd.wire import (
    DEVICE_STORE,
    MODEL_REF_KEY,
    NON_FINITE_DETAIL,
    BadReply,
    decode_update,
    reply_nbytes,
)

log = logging.getLogger("fedbgmd")

LrSchedule = Callable[[int], float]


class RobustStrategy(Strategy):
    """Sampling, defences, (block) robust aggregation and server step. See the module docstring."""

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        num_clients: int,
        clients_per_round: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        block: bool = False,
        beta: float = 0.1,
        selector: str = "sample",
        memory: str = "per_client",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_nesterov: bool = False,
        weighted: bool = False,
        min_replies: int = 1,
        max_update_norm: float | None = None,
        client_lr: LrSchedule = lambda _round: 0.01,
        adversary: OmniscientAttack | None = None,
        byzantine_ids: Iterable[int] = (),
        max_reply_bytes: int | None = None,
        stop_on_divergence: bool = True,
    ) -> None:
        if block and getattr(aggregator, "stateful", False):
            # its state (e.g. cclip's previous output) lives on the coordinates of the last
            # call; the block step draws other coordinates every round
            raise ValueError(
                f"aggregator {aggregator!r} keeps state between rounds: not usable in the block "
                "step (use a stateless form, e.g. cclip with center=median)"
            )
        self.aggregator = aggregator
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.device = torch.device(device)
        self.block, self.beta, self.selector = block, beta, selector
        self.memory_kind = memory
        self.server_lr, self.momentum, self.nesterov = server_lr, server_momentum, server_nesterov
        self.weighted = weighted
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.client_lr = client_lr
        self.adversary = adversary
        self.byzantine_ids = frozenset(int(i) for i in byzantine_ids)
        self.max_reply_bytes = max_reply_bytes
        self.stop_on_divergence = stop_on_divergence
        # set when the global model stops being finite: every later reply would be rejected
        self.diverged: str | None = None
        self.node_to_partition: dict[int, int] = {}
        self.round_info: dict[int, dict[str, Any]] = {}
        self._x: torch.Tensor | None = None  # flat global model on self.device
        self._spec: FlatSpec | None = None
        self._passthrough: dict[str, torch.Tensor] = {}
        self._momentum_buf: torch.Tensor | None = None
        self._memory: Any = None
        self._t_sent: float = 0.0
        # in-process engine (engine.device_resident): the global model goes to the clients as a
        # DEVICE_STORE reference and is serialised only when someone needs an ArrayRecord
        self.model_by_reference = False
        # the clients are this process's simulation: a reply saying their plug-in crashed is a
        # bug to fail the run on (remote nodes' errors stay rejected replies); set by ServerRun
        self.own_clients = False
        self._model_nbytes = 0
        # set by the server, which partitions the same data as the clients: with weighted=true
        # the weights are these sizes, not the counts clients claim (a hostile claim of 1e30
        # would otherwise own a weighted aggregate)
        self.partition_sizes: list[int] | None = None
        # (method, bits[, qsgd bucket size]) every honest client uses; other settings: rejected
        self.expected_quantization: tuple[Any, ...] | None = None

    # ----------------------------------------------------------------------------- state
    def set_node_map(self, node_to_partition: dict[int, int]) -> None:
        self.node_to_partition = dict(node_to_partition)

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": None if self._x is None else self._x.cpu(),
            "momentum": None if self._momentum_buf is None else self._momentum_buf.cpu(),
            "memory": None if self._memory is None else self._memory.state_dict(),
            # a stateful aggregator's state (cclip with center="previous"); {} otherwise
            "aggregator": _aggregator_state(self.aggregator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("x") is not None:
            self._x = state["x"].to(self.device)
        if state.get("momentum") is not None:
            self._momentum_buf = state["momentum"].to(self.device)
        if state.get("memory") is not None:
            self._ensure_memory(int(self._x.numel()) if self._x is not None else 0)
            self._memory.load_state_dict(state["memory"])
        if state.get("aggregator") and hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state["aggregator"])

    def _ensure_memory(self, dim: int) -> None:
        if self._memory is None and self.block:
            self._memory = make_memory(
                self.memory_kind, dim=dim, device=self.device, dtype=torch.float32
            )

    # ----------------------------------------------------------------------------- rounds
    def summary(self) -> None:
        log.debug("RobustStrategy(%s, block=%s, beta=%s)", self.aggregator, self.block, self.beta)

    def sample_partitions(self, server_round: int) -> list[int]:
        """Seeded draw of this round's partitions (same draw on every engine)."""
        if self.clients_per_round >= self.num_clients:
            return list(range(self.num_clients))
        g = generator(self.seed, server_round, "sampling")
        perm = torch.randperm(self.num_clients, generator=g)[: self.clients_per_round]
        return sorted(int(i) for i in perm)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        if self._spec is None:  # first round (or first round after a resume)
            x, self._spec = self._flatten(arrays)
            self._x = x if self._x is None else self._x
        partition_to_node = {p: n for n, p in self.node_to_partition.items()}
        chosen = self.sample_partitions(server_round)
        missing = [p for p in chosen if p not in partition_to_node]
        present = [p for p in chosen if p in partition_to_node]
        lr = float(self.client_lr(server_round))
        values = {**dict(config), "server-round": server_round, "lr": lr}
        if self.model_by_reference:
            assert self._x is not None
            values[MODEL_REF_KEY] = DEVICE_STORE.share(self._x)
            arrays = ArrayRecord()  # a placeholder: the reference stands for the model
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(values)})
        msgs = [
            Message(content, partition_to_node[p], "train", group_id=str(server_round))
            for p in present
        ]
        self.round_info[server_round] = {
            "t_start": t0,
            "sampled": chosen,
            "missing_nodes": len(missing),
            "lr": lr,
            "bytes_down": len(msgs) * self._model_nbytes,  # payload, as bytes_up
            "sent": len(msgs),
            "sent_nodes": [m.metadata.dst_node_id for m in msgs],
        }
        if missing:
            log.warning("round %d: no node serves partitions %s", server_round, missing)
        self._t_sent = time.perf_counter()
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t_recv = time.perf_counter()
        info = self.round_info.setdefault(server_round, {"t_start": self._t_sent})
        info["transport_s"] = t_recv - self._t_sent
        assert self._x is not None and self._spec is not None  # set in configure_train
        dim = self._x.numel()
        replies = list(replies)
        accepted, reasons, stats = self._validate(replies, dim, set(info.get("sampled", [])))
        DEVICE_STORE.clear()  # device references of rejected replies are dropped here
        updates: torch.Tensor | None = None
        if self.adversary is not None and accepted:
            # simulation only: the omniscient rows replace the Byzantine replies and go through
            # the replies' checks (finiteness, max_update_norm): rejected ones are counted, dropped
            updates = stack_rows([u for _, u, _ in accepted]).to(self.device)
            updates, why = self._adversary_rows(
                updates, [pid for pid, _, _ in accepted], server_round
            )
            if any(w is not None for w in why):
                reasons.update(w for w in why if w is not None)
                keep = [r for r, w in enumerate(why) if w is None]
                accepted = [accepted[r] for r in keep]
                updates = updates[torch.tensor(keep, dtype=torch.long, device=updates.device)]
        # the nodes asked that did not answer (before the round's timeout, or vanished); counted
        # by node, so a duplicate reply cannot hide a silent node
        answered = {msg.metadata.src_node_id for msg in replies}
        missing = len(set(info.get("sent_nodes", ())) - answered)
        if missing > 0:
            reasons["timeout"] += missing
        if reasons:  # one line a round, not one per reply (a Byzantine fifth would flood the log)
            log.warning(
                "round %d: %d of %d sampled replies rejected (%s)",
                server_round,
                sum(reasons.values()),
                len(info.get("sent_nodes", ())) or len(replies),
                ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())),
            )
        info.update(stats)
        info["replies_accepted"] = len(accepted)
        info["replies_rejected"] = sum(reasons.values())
        info["rejections"] = dict(reasons)
        if len(accepted) < self.min_replies:
            info["skipped"] = f"{len(accepted)} accepted replies < min_replies={self.min_replies}"
            log.warning("round %d skipped: %s", server_round, info["skipped"])
            # rejections are never divergence, not even of every reply (two Byzantine clients
            # that made up a round's sample stopped a finite run): only a non-finite model is.
            # Every reply non-finite may mean the model broke: the server checks it (evaluation)
            if not accepted and reasons.keys() & {"non_finite", "bad_metrics"}:
                info["check_model"] = True
            info["agg_time_s"] = 0.0
            return None, None
        ids = [pid for pid, _, _ in accepted]
        if updates is None:
            updates = stack_rows([u for _, u, _ in accepted]).to(self.device)
        sizes = self.partition_sizes
        num_examples = torch.tensor(
            [m["num-examples"] if sizes is None else sizes[pid] for pid, _, m in accepted],
            dtype=torch.float32,
        )
        self._sync()
        t_agg = time.perf_counter()
        weights = num_examples.to(self.device) if self.weighted else None
        try:
            direction, diag = self.aggregate_updates(updates, ids, server_round, weights)
        except AggregationRefused as err:  # Krum/Bulyan with too few rows this round, ...
            # (anything else a plug-in raises is a bug: it ends the run, see fedbgmd.core.errors)
            info["skipped"] = f"aggregation refused: {err}"
            info["agg_time_s"] = time.perf_counter() - t_agg
            log.warning("round %d skipped: %s", server_round, info["skipped"])
            return None, None
        overflowed = int(diag.pop("memory_overflowed", 0.0))
        if overflowed:  # P = γG + M of these clients was not finite: rejected, not aggregated
            reasons["memory_overflow"] += overflowed
            info["replies_accepted"] -= overflowed
            info["replies_rejected"] += overflowed
            info["rejections"] = dict(reasons)
            log.warning(
                "round %d: %d clients' residual memory overflowed", server_round, overflowed
            )
        self._x = self._server_step(self._x, direction)
        self._sync()
        if self.diverged is None and not all_finite(self._x):
            self.diverged = f"round {server_round}: the global model has NaN/Inf parameters"
            info["diverged"] = True
        info["agg_time_s"] = time.perf_counter() - t_agg
        info.update(diag)
        if diag.get("rows_dropped"):
            log.warning(
                "round %d: the aggregator dropped %d accepted rows",
                server_round,
                diag["rows_dropped"],
            )
        info["train_loss"] = median_of_claims([m["train-loss"] for _, _, m in accepted])
        new = ArrayRecord() if self.model_by_reference else self._to_arrays(self._x)
        metrics = MetricRecord(
            {"train-loss": info["train_loss"], "replies-accepted": info["replies_accepted"]}
        )
        return new, metrics

    def aggregate_updates(
        self,
        updates: torch.Tensor,
        client_ids: list[int],
        server_round: int,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Direction u_t (d,) from the validated updates (n, d); override in a custom strategy."""
        if not self.block:
            res = self.aggregator(updates, weights)
            return self.server_lr * res.vector, _agg_diag(res)
        dim = updates.shape[1]
        self._ensure_memory(dim)
        k = block_size(self.beta, dim)
        step = bgmd_step(
            updates,
            aggregator=self.aggregator,
            k=k,
            memory=self._memory,
            client_ids=client_ids,
            step_size=self.server_lr,
            selector=self.selector,
            generator=generator(self.seed, server_round, "block", device=self.device),
            weights=weights,
        )
        diag = _agg_diag(step.aggregation)
        diag["relative_residual"] = float(step.relative_residual)
        diag["memory_norm"] = float(step.memory_norm)
        if step.overflowed:
            diag["memory_overflowed"] = float(len(step.overflowed))
        return step.vector, diag

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        start_round: int = 1,
    ) -> Result:
        """Flower's round loop (``Strategy.start``), able to continue from ``start_round``.

        Same sequence as Flower's: configure_train -> send_and_receive -> aggregate_train ->
        configure_evaluate -> send_and_receive -> aggregate_evaluate -> evaluate_fn.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        if evaluate_fn is not None and start_round == 1:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for rnd in range(start_round, num_rounds + 1):
            messages = list(self.configure_train(rnd, arrays, train_config, grid))
            replies = grid.send_and_receive(messages, timeout=timeout)
            new, metrics = self.aggregate_train(rnd, replies)
            if new is not None:
                result.arrays = arrays = new
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            eval_msgs = list(self.configure_evaluate(rnd, arrays, evaluate_config, grid))
            if eval_msgs:
                agg = self.aggregate_evaluate(
                    rnd, grid.send_and_receive(eval_msgs, timeout=timeout)
                )
                if agg is not None:
                    result.evaluate_metrics_clientapp[rnd] = agg
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            if self.diverged is not None and self.stop_on_divergence:
                # every later round would reject all replies (computed from a NaN/Inf model)
                log.warning("%s; stopping the run (stop_on_divergence=true)", self.diverged)
                break
        if self.model_by_reference and self._x is not None and self.holds_model:
            result.arrays = self._to_arrays(self._x)  # the rounds passed a placeholder
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralised (the ServerApp's evaluate_fn)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # ----------------------------------------------------------------------------- helpers
    def _validate(
        self, replies: list[Message], dim: int, sampled: set[int]
    ) -> tuple[list[tuple[int, torch.Tensor, dict]], Counter[str], dict[str, Any]]:
        """Decode every reply; keep (partition id, update, metrics), count rejections by reason."""
        max_bytes = self.max_reply_bytes or (8 * dim + 4096)  # 2x a float32 update + headers
        reasons: Counter[str] = Counter()
        by_pid: dict[int, tuple[torch.Tensor, dict]] = {}
        bytes_up, client_times = 0, []

        def reject(err: BadReply) -> None:
            reasons[err.reason] += 1
            log.debug("rejected reply: %s", err)  # summarised once per round (aggregate_train)

        # Two passes with the checks in the order of one: decoding, then the finiteness of every
        # decoded update at once (one host read, not one per reply: on a GPU each read waits for
        # the device), then the checks that compare replies with each other.
        decoded: list[tuple[int, torch.Tensor, dict]] = []
        for msg in replies:
            try:
                if msg.has_error():
                    reason = msg.error.reason or ""
                    if self.own_clients and PluginFailed.__name__ in reason:
                        raise PluginFailed(f"a client's plug-in failed: {reason}")
                    raise BadReply("client_error", reason)
                node = msg.metadata.src_node_id
                pid = self.node_to_partition.get(node)
                if pid is None or (sampled and pid not in sampled):
                    raise BadReply("unknown_node", f"node {node}")
                bytes_up += reply_nbytes(msg.content)
                vec, metrics = decode_update(
                    msg.content, dim, max_bytes, self.expected_quantization
                )
                decoded.append((pid, vec, metrics))
            except BadReply as err:
                reject(err)
            except PluginFailed:
                raise
            except Exception as err:  # a hostile reply must never end the run
                reject(BadReply("undecodable", f"{type(err).__name__}: {err}"))
        finite = all_finite_each([vec for _, vec, _ in decoded])
        for (pid, vec, metrics), ok in zip(decoded, finite):
            try:
                if not ok:
                    raise BadReply("non_finite", NON_FINITE_DETAIL)
                if int(metrics["partition-id"]) != pid:
                    raise BadReply("wrong_partition", f"claims {metrics['partition-id']}, is {pid}")
                if pid in by_pid:
                    raise BadReply("duplicate", f"partition {pid}")
                if self.max_update_norm is not None and vec.norm() > self.max_update_norm:
                    raise BadReply("norm_too_large", f"{float(vec.norm()):.3g}")
                client_times.append(float(metrics["client-time-s"]))
                by_pid[pid] = (vec, metrics)
            except BadReply as err:
                reject(err)
        accepted = [(pid, *by_pid[pid]) for pid in sorted(by_pid)]  # order by partition id
        # what clients claim is bounded (decode_update) and aggregated robustly: the round's
        # summed client time is estimated as n x the median claim
        client_time = len(client_times) * median_of_claims(client_times) if client_times else 0.0
        return accepted, reasons, {"bytes_up": bytes_up, "client_time_s": client_time}

    def _apply_adversary(
        self, updates: torch.Tensor, ids: list[int], server_round: int
    ) -> torch.Tensor:
        """Simulation only: the omniscient attack sees the honest rows and rewrites Byzantine ones."""
        assert self.adversary is not None
        byz = [i for i, pid in enumerate(ids) if pid in self.byzantine_ids]
        honest = [i for i, pid in enumerate(ids) if pid not in self.byzantine_ids]
        if not byz or not honest:
            return updates
        g = generator(self.seed, server_round, "omniscient", device=updates.device)
        # the adversary's trial aggregations must not advance a stateful aggregator
        probe = self.aggregator.probe() if hasattr(self.aggregator, "probe") else self.aggregator
        fake = self.adversary(
            updates[honest], len(byz), generator=g, aggregator=lambda x: probe(x).vector
        )
        out = updates.clone()
        out[byz] = fake.to(out.dtype)
        return out

    def _adversary_rows(
        self, updates: torch.Tensor, ids: list[int], server_round: int
    ) -> tuple[torch.Tensor, list[str | None]]:
        """The accepted rows (n, d) with the omniscient adversary's rows written in, and per row
        the reason it is rejected (``None``: kept) — the rules every reply meets
        (:func:`row_rejections`), applied to the rows the adversary wrote (the others passed
        :meth:`_validate`). The one place of this rule: the fused engine calls it too."""
        out = self._apply_adversary(updates, ids, server_round)
        why: list[str | None] = [None] * len(ids)
        if out is updates:  # no Byzantine or no honest row among the accepted: nothing written
            return out, why
        byz = [r for r, pid in enumerate(ids) if pid in self.byzantine_ids]
        for r, w in zip(byz, row_rejections(out[byz], self.max_update_norm)):
            why[r] = w
        return out, why

    def _server_step(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        if self.momentum == 0.0:
            return x - direction
        buf = self._momentum_buf
        buf = direction.clone() if buf is None else self.momentum * buf + direction
        self._momentum_buf = buf
        step = direction + self.momentum * buf if self.nesterov else buf
        return x - step

    def _flatten(self, arrays: ArrayRecord) -> tuple[torch.Tensor, FlatSpec]:
        state = arrays.to_torch_state_dict()
        flat, spec = flatten_state(state)
        self._passthrough = {k: v for k, v in state.items() if not v.is_floating_point()}
        self._model_nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return flat.to(self.device, torch.float32), spec

    @property
    def holds_model(self) -> bool:
        """True once the strategy's flat model is the global model (after the first round)."""
        return self._x is not None and self._spec is not None

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict of views into the strategy's flat model (read only)."""
        assert self._x is not None and self._spec is not None
        return unflatten_state(self._x.detach(), self._spec, passthrough=self._passthrough)

    def _to_arrays(self, x: torch.Tensor) -> ArrayRecord:
        assert self._spec is not None
        state = unflatten_state(x.detach().cpu(), self._spec, passthrough=self._passthrough)
        return ArrayRecord(state)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def row_rejections(rows: torch.Tensor, max_update_norm: float | None) -> list[str | None]:
    """Per row of ``rows`` (m, d), the reason a reply with that update is rejected (``None``:
    accepted), in :meth:`RobustStrategy._validate`'s order: ``non_finite``, then
    ``norm_too_large`` (the Euclidean norm above ``max_update_norm``). One host read."""
    finite = torch.isfinite(rows).all(dim=1)
    if max_update_norm is None:
        return [None if ok else "non_finite" for ok in finite.tolist()]
    big = torch.linalg.vector_norm(rows, dim=1) > max_update_norm
    flags = torch.stack([finite, big]).tolist()
    return [
        "non_finite" if not ok else "norm_too_large" if too_big else None
        for ok, too_big in zip(*flags)
    ]


def median_of_claims(values: list[float]) -> float:
    """Median of finite floats, finite whatever they are (two claims of 1.7e308 summed to inf)."""
    v = sorted(values)
    k = len(v) // 2
    return v[k] if len(v) % 2 else v[k - 1] / 2 + v[k] / 2


def _aggregator_state(agg: Any) -> dict[str, Any]:
    state = getattr(agg, "state_dict", None)
    return dict(state()) if callable(state) else {}


def _agg_diag(res: AggregationResult) -> dict[str, float]:
    diag: dict[str, float] = {
        "agg_iterations": float(res.iterations),
        "agg_converged": float(res.converged),
    }
    if res.n_dropped:  # accepted rows the aggregator still dropped (non-finite after weighting)
        diag["rows_dropped"] = float(res.n_dropped)
    diag.update({k: float(v) for k, v in (res.extra or {}).items()})
    return diag
