"""RobustStrategy: one Flower strategy for every aggregator, optionally inside the BGMD block step.

A round (Flower Message API, ``flwr.serverapp.strategy.Strategy``), each job done by one object:

1. ``configure_train``: the :class:`PartitionSampler` draws the round's clients (seeded by
   (seed, round)); they get the global model x_t (:class:`GlobalModel`) and the round's lr.
2. ``aggregate_train`` reads as Algorithm 3 of the paper (server side):

   - G_t   = the replies the :class:`ReplyValidator` accepts, one row per client, by client id
     (rejections counted by reason); in simulation the :class:`OmniscientHook` rewrites the
     Byzantine rows;
   - g̃_t   = :meth:`aggregate_updates`: plain γ_s·AGG(G_t), or the :class:`BlockStep`
     P_t = γ_s G_t + M_t, Δ_t = C_k(P_t), M_{t+1} = P_t − Δ_t, g̃_t = AGG(Δ_t) (FL-BGMD with
     AGG = GM, a block CM with CM, ...);
   - x_{t+1} = x_t − g̃_t by the :class:`ServerOptimizer` (or its momentum step).

With fewer than ``min_replies`` accepted replies the round is skipped (x, memory unchanged) and
the reason is logged. Per-round diagnostics are kept in :attr:`round_info`. A non-finite global
model is divergence (:attr:`diverged`; the run stops when ``stop_on_divergence``).

Plug-in contract for a custom strategy: subclass and override :meth:`aggregate_updates`, which
receives the validated (n, d) tensor, the client ids of its rows and the round, and returns
the direction u_t (d,) plus a dict of float diagnostics. Everything else (sampling, validation,
memory, momentum, logging) is inherited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedbgmd.attacks.base import OmniscientAttack
from fedbgmd.components import generator
from fedbgmd.core import (
    AggregationRefused,
    AggregationResult,
    Aggregator,
    BlockStep,
    ServerOptimizer,
    stack_rows,
)
from fedbgmd.strategies.adversary import OmniscientHook
from fedbgmd.strategies.model import GlobalModel
from fedbgmd.strategies.sampling import PartitionSampler
from fedbgmd.strategies.validation import (
    ReplyValidator,
    Verdict,
    median_of_claims,
    row_rejections,
)
from fedbgmd.wire import DEVICE_STORE, MODEL_REF_KEY

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
        self.aggregator = aggregator
        self.seed = seed
        self.device = torch.device(device)
        self.sampler = PartitionSampler(num_clients, clients_per_round, seed)
        self.validator = ReplyValidator(max_update_norm, max_reply_bytes)
        self.model = GlobalModel(self.device)
        self.block_step: BlockStep | None = None
        if block:
            self.block_step = BlockStep(
                aggregator,
                beta,
                selector,
                memory,
                device=self.device,
                generator_for=lambda rnd: generator(seed, rnd, "block", device=self.device),
            )
        self.server_opt = ServerOptimizer(server_lr, server_momentum, server_nesterov)
        self.omniscient = (
            None
            if adversary is None
            else OmniscientHook(adversary, byzantine_ids, aggregator, seed)
        )
        self.weighted = weighted
        self.min_replies = min_replies
        self.client_lr = client_lr
        self.stop_on_divergence = stop_on_divergence
        # set when the global model stops being finite: every later reply would be rejected
        self.diverged: str | None = None
        self.node_to_partition: dict[int, int] = {}
        self.round_info: dict[int, dict[str, Any]] = {}
        self._t_sent: float = 0.0
        # in-process engine (engine.device_resident): the global model goes to the clients as a
        # DEVICE_STORE reference and is serialised only when someone needs an ArrayRecord
        self.model_by_reference = False
        # set by the server, which partitions the same data as the clients: with weighted=true
        # the weights are these sizes, not the counts clients claim (a hostile claim of 1e30
        # would otherwise own a weighted aggregate)
        self.partition_sizes: list[int] | None = None

    # ------------------------------------------------------------ settings held by the parts
    @property
    def block(self) -> bool:
        return self.block_step is not None

    @property
    def beta(self) -> float | None:
        return None if self.block_step is None else self.block_step.beta

    @property
    def selector(self) -> str | None:
        return None if self.block_step is None else self.block_step.selector

    @property
    def memory_kind(self) -> str | None:
        return None if self.block_step is None else self.block_step.memory_kind

    @property
    def server_lr(self) -> float:
        return self.server_opt.lr

    @property
    def momentum(self) -> float:
        return self.server_opt.momentum

    @property
    def nesterov(self) -> bool:
        return self.server_opt.nesterov

    @property
    def adversary(self) -> OmniscientAttack | None:
        return None if self.omniscient is None else self.omniscient.attack

    @property
    def byzantine_ids(self) -> frozenset[int]:
        return frozenset() if self.omniscient is None else self.omniscient.byzantine_ids

    @property
    def max_update_norm(self) -> float | None:
        return self.validator.max_update_norm

    @max_update_norm.setter
    def max_update_norm(self, value: float | None) -> None:
        self.validator.max_update_norm = value

    @property
    def expected_quantization(self) -> tuple[Any, ...] | None:
        return self.validator.expected_quantization

    @expected_quantization.setter
    def expected_quantization(self, value: tuple[Any, ...] | None) -> None:
        self.validator.expected_quantization = value

    @property
    def own_clients(self) -> bool:
        return self.validator.own_clients

    @own_clients.setter
    def own_clients(self, value: bool) -> None:
        self.validator.own_clients = value

    # ----------------------------------------------------------------------------- state
    def set_node_map(self, node_to_partition: dict[int, int]) -> None:
        self.node_to_partition = dict(node_to_partition)

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": None if self.model.x is None else self.model.x.cpu(),
            "momentum": self.server_opt.state_dict()["momentum"],
            "memory": None if self.block_step is None else self.block_step.state_dict()["memory"],
            # a stateful aggregator's state (cclip with center="previous"); {} otherwise
            "aggregator": _aggregator_state(self.aggregator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("x") is not None:
            self.model.x = state["x"].to(self.device)
        self.server_opt.load_state_dict(state, self.device)
        if self.block_step is not None:
            self.block_step.load_state_dict(state)
        if state.get("aggregator") and hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state["aggregator"])

    # ----------------------------------------------------------------------------- rounds
    def summary(self) -> None:
        log.debug("RobustStrategy(%s, block=%s, beta=%s)", self.aggregator, self.block, self.beta)

    def sample_partitions(self, server_round: int) -> list[int]:
        """Seeded draw of this round's partitions (same draw on every engine)."""
        return self.sampler.sample(server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        if not self.model.ready:  # first round (or first round after a resume)
            self.model.adopt(arrays)
        partition_to_node = {p: n for n, p in self.node_to_partition.items()}
        chosen = self.sample_partitions(server_round)
        missing = [p for p in chosen if p not in partition_to_node]
        present = [p for p in chosen if p in partition_to_node]
        lr = float(self.client_lr(server_round))
        values = {**dict(config), "server-round": server_round, "lr": lr}
        if self.model_by_reference:
            values[MODEL_REF_KEY] = self.model.share()
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
            "bytes_down": len(msgs) * self.model.nbytes,  # payload, as bytes_up
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
        info = self.round_info.setdefault(server_round, {"t_start": self._t_sent})
        info["transport_s"] = time.perf_counter() - self._t_sent
        assert self.model.ready  # set in configure_train
        replies = list(replies)
        # G_t: the accepted replies (and the omniscient adversary's rows), one per client
        verdict = self.validator.validate(replies, self.model.dim, self._client_of(info))
        DEVICE_STORE.clear()  # device references of rejected replies are dropped here
        updates = self._byzantine_rows(verdict, server_round)
        self._count_rejections(server_round, info, verdict, replies)
        if len(verdict.accepted) < self.min_replies:
            return self._skip(
                server_round,
                info,
                f"{len(verdict.accepted)} accepted replies < min_replies={self.min_replies}",
                check_model=not verdict.accepted
                and bool(verdict.reasons.keys() & {"non_finite", "bad_metrics"}),
            )
        if updates is None:
            updates = stack_rows([u for _, u, _ in verdict.accepted]).to(self.device)
        weights = self._weights(verdict) if self.weighted else None
        self._sync()
        t_agg = time.perf_counter()
        try:  # g̃_t (block: P_t = γG_t + M_t, Δ_t = C_k(P_t), M_{t+1} = P_t − Δ_t, AGG(Δ_t))
            direction, diag = self.aggregate_updates(updates, verdict.ids, server_round, weights)
        except AggregationRefused as err:  # Krum/Bulyan with too few rows this round, ...
            # (anything else a plug-in raises is a bug: it ends the run, see fedbgmd.core.errors)
            info["agg_time_s"] = time.perf_counter() - t_agg
            return self._skip(server_round, info, f"aggregation refused: {err}", timed=True)
        self._count_overflow(server_round, info, verdict, int(diag.pop("memory_overflowed", 0)))
        self.model.x = self.server_opt.step(self.model.x, direction)  # x_{t+1} = x_t − g̃_t
        self._sync()
        self._check_divergence(server_round, info)
        info["agg_time_s"] = time.perf_counter() - t_agg
        info.update(diag)
        if diag.get("rows_dropped"):
            log.warning(
                "round %d: the aggregator dropped %d accepted rows",
                server_round,
                diag["rows_dropped"],
            )
        info["train_loss"] = median_of_claims([m["train-loss"] for _, _, m in verdict.accepted])
        new = ArrayRecord() if self.model_by_reference else self.model.to_arrays()
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
        gamma = self.server_opt.lr
        if self.block_step is None:
            res = self.aggregator(updates, weights)
            return gamma * res.vector, _agg_diag(res)
        step = self.block_step(updates, client_ids, server_round, step_size=gamma, weights=weights)
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
        if self.model_by_reference and self.holds_model:
            result.arrays = self.model.to_arrays()  # the rounds passed a placeholder
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
    def _client_of(self, info: dict[str, Any]) -> Callable[[int], int | None]:
        """Node id -> the partition it was asked for this round (None: not asked)."""
        sampled = set(info.get("sampled", ()))

        def client_of(node: int) -> int | None:
            pid = self.node_to_partition.get(node)
            return None if pid is None or (sampled and pid not in sampled) else pid

        return client_of

    def _byzantine_rows(self, verdict: Verdict, server_round: int) -> torch.Tensor | None:
        """Simulation only: the stacked rows with the omniscient adversary's written in (its rows
        meet the replies' checks; rejected ones are dropped from ``verdict``); None without one."""
        if self.omniscient is None or not verdict.accepted:
            return None
        updates = stack_rows([u for _, u, _ in verdict.accepted]).to(self.device)
        updates, why = self._adversary_rows(updates, verdict.ids, server_round)
        if any(w is not None for w in why):
            verdict.drop(why)
            keep = [r for r, w in enumerate(why) if w is None]
            updates = updates[torch.tensor(keep, dtype=torch.long, device=updates.device)]
        return updates

    def _adversary_rows(
        self, updates: torch.Tensor, ids: list[int], server_round: int
    ) -> tuple[torch.Tensor, list[str | None]]:
        """:meth:`OmniscientHook.rows` with this strategy's norm bound (the fused engine calls it)."""
        assert self.omniscient is not None
        return self.omniscient.rows(updates, ids, server_round, self.max_update_norm)

    def _weights(self, verdict: Verdict) -> torch.Tensor:
        sizes = self.partition_sizes
        return torch.tensor(
            [m["num-examples"] if sizes is None else sizes[c] for c, _, m in verdict.accepted],
            dtype=torch.float32,
        ).to(self.device)

    def _count_rejections(
        self, server_round: int, info: dict[str, Any], verdict: Verdict, replies: list[Message]
    ) -> None:
        reasons = verdict.reasons
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
        info["bytes_up"] = verdict.bytes_up
        info["client_time_s"] = verdict.client_time_s
        info["replies_accepted"] = len(verdict.accepted)
        info["replies_rejected"] = sum(reasons.values())
        info["rejections"] = dict(reasons)

    def _count_overflow(
        self, server_round: int, info: dict[str, Any], verdict: Verdict, overflowed: int
    ) -> None:
        """Clients whose P = γG + M was not finite: rejected, not aggregated (the block step)."""
        if not overflowed:
            return
        verdict.reasons["memory_overflow"] += overflowed
        info["replies_accepted"] -= overflowed
        info["replies_rejected"] += overflowed
        info["rejections"] = dict(verdict.reasons)
        log.warning("round %d: %d clients' residual memory overflowed", server_round, overflowed)

    def _skip(
        self,
        server_round: int,
        info: dict[str, Any],
        why: str,
        *,
        check_model: bool = False,
        timed: bool = False,
    ) -> tuple[None, None]:
        """The round changes nothing (x, memory and momentum as they were)."""
        info["skipped"] = why
        log.warning("round %d skipped: %s", server_round, why)
        # rejections are never divergence, not even of every reply (two Byzantine clients
        # that made up a round's sample stopped a finite run): only a non-finite model is.
        # Every reply non-finite may mean the model broke: the server checks it (evaluation)
        if check_model:
            info["check_model"] = True
        if not timed:
            info["agg_time_s"] = 0.0
        return None, None

    def _check_divergence(self, server_round: int, info: dict[str, Any]) -> None:
        if self.diverged is None and not self.model.finite():
            self.diverged = f"round {server_round}: the global model has NaN/Inf parameters"
            info["diverged"] = True

    @property
    def holds_model(self) -> bool:
        """True once the strategy's flat model is the global model (after the first round)."""
        return self.model.ready

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict of views into the strategy's flat model (read only)."""
        return self.model.state()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _aggregator_state(agg: Any) -> dict[str, Any]:
    state = getattr(agg, "state_dict", None)
    return dict(state()) if callable(state) else {}


def _agg_diag(res: AggregationResult) -> dict[str, float]:
    diag: dict[str, float] = {
        "gm_iterations": float(res.iterations),
        "gm_converged": float(res.converged),
    }
    if res.n_dropped:  # accepted rows the aggregator still dropped (non-finite after weighting)
        diag["rows_dropped"] = float(res.n_dropped)
    diag.update({k: float(v) for k, v in (res.extra or {}).items()})
    return diag


__all__ = ["RobustStrategy", "median_of_claims", "row_rejections"]
