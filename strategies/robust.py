"""RobustStrategy: a Flower strategy for every robust aggregator, optionally inside the BGMD block step.

A drop-in for ``flwr.serverapp.strategy.FedAvg`` (it subclasses it and takes its parameters):
sampling, train config, federated evaluation, the round loop and the Result behave as FedAvg's.
What differs is what happens to the replies. A round, each job done by one object:

1. ``configure_train``: the round's clients get the global model x_t (:class:`GlobalModel`) and
   the train config. Clients are the nodes of the grid, sampled as FedAvg samples them
   (``fraction_train``, ``min_train_nodes``, waiting for ``min_available_nodes``) but with a
   generator seeded by (seed, round); or, in fedbgmd's own engines (``num_clients`` given),
   partitions drawn by the :class:`PartitionSampler` and reached through the node map.
2. ``aggregate_train`` reads as Algorithm 3 of the paper (server side):

   - G_t   = the replies the :class:`ReplyValidator` accepts (trained weights y, turned into
     x_t − y, or fedbgmd's compact update), one row per client, by client id (rejections
     counted by reason); in simulation the :class:`OmniscientHook` rewrites the Byzantine rows;
   - g̃_t   = :meth:`aggregate_updates`: plain γ_s·AGG(G_t), or the :class:`BlockStep`
     P_t = γ_s G_t + M_t, Δ_t = C_k(P_t), M_{t+1} = P_t − Δ_t, g̃_t = AGG(Δ_t) (FL-BGMD with
     AGG = GM, a block CM with CM, ...);
   - x_{t+1} = x_t − g̃_t by the :class:`ServerOptimizer` (or its momentum step).

A client is its partition id when the engine maps nodes to partitions, else the replying node id.
Below ``min_replies`` accepted replies the round is skipped (x, memory unchanged). Diagnostics go
to the train MetricRecord, the log and :attr:`round_info`; a non-finite model is divergence.

Plug-in contract for a custom strategy: subclass and override :meth:`aggregate_updates`, which
receives the validated (n, d) tensor, the client ids of its rows and the round, and returns
the direction u_t (d,) plus a dict of float diagnostics. Everything else (sampling, validation,
memory, momentum, logging) is inherited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log as flwr_log

from fedbgmd.attacks.base import OmniscientAttack
from fedbgmd.core import (
    AggregationRefused,
    AggregationResult,
    Aggregator,
    BlockStep,
    ServerOptimizer,
    get_aggregator,
    stack_rows,
)
from fedbgmd.seeding import generator
from fedbgmd.strategies.adversary import OmniscientHook
from fedbgmd.strategies.model import GlobalModel
from fedbgmd.strategies.rounds import EvaluateFn, run_rounds, train_metrics
from fedbgmd.strategies.sampling import PartitionSampler, sample_nodes
from fedbgmd.strategies.validation import (
    ReplyValidator,
    Verdict,
    median_of_claims,
    row_rejections,
)
from fedbgmd.wire import DEVICE_STORE, MODEL_REF_KEY

log = logging.getLogger("fedbgmd")

LrSchedule = Callable[[int], float]
MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]


def _part(part: str, attr: str, settable: bool = False) -> Any:
    """A setting held by one of the strategy's parts (``self.<part>.<attr>``; None without it)."""

    def get(self: Any) -> Any:
        obj = getattr(self, part)
        return None if obj is None else getattr(obj, attr)

    def put(self: Any, value: Any) -> None:
        setattr(getattr(self, part), attr, value)

    return property(get, put if settable else None, doc=f"``{part}.{attr}``")


class RobustStrategy(FedAvg):
    """FedAvg's interface, robust aggregation (see the module docstring).

    FedAvg's parameters keep their meaning and defaults. fedbgmd's, all keyword-only:

    Args:
        aggregator: a registered rule name (``"gm"``, ``"cm"``, ``"krum"``, ...; see
            ``fedbgmd.core.available_aggregators``) or an aggregator object
            (``get_aggregator("krum", f=1)``, or your own).
        block, beta, selector, memory: the BGMD block step (k = ⌈β·d⌉ coordinates chosen by
            ``selector``; residual memory ``per_client``, ``mean`` or ``none``).
        server_lr, server_momentum, server_nesterov: the server step (γ_s, heavy ball).
        weighted: weight the rows by the clients' ``weighted_by_key`` (sample counts). Off by
            default: a robust rule must not let one client's claim weigh for many.
        min_replies: fewer accepted replies and the round is skipped.
        max_update_norm, max_reply_bytes, expected_quantization: reply bounds (None: off /
            2x a float32 model / any supported quantizer).
        stop_on_divergence: stop the run once the global model is not finite.
        seed, device: the seeded draws (sampling, block selection) and where aggregation runs.
        num_clients, clients_per_round, client_lr, adversary, byzantine_ids: fedbgmd's own
            engines (clients are partitions mapped to nodes by :meth:`set_node_map`; the lr
            schedule goes into the train config; the simulated omniscient adversary).
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        *,
        aggregator: Aggregator | str = "gm",
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
        max_reply_bytes: int | None = None,
        expected_quantization: tuple[Any, ...] | None = None,
        stop_on_divergence: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_clients: int | None = None,
        clients_per_round: int | None = None,
        client_lr: LrSchedule | None = None,
        adversary: OmniscientAttack | None = None,
        byzantine_ids: Iterable[int] = (),
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if isinstance(aggregator, str):
            aggregator = get_aggregator(aggregator)
        self.aggregator = aggregator
        self.seed = seed
        self.device = torch.device(device)
        self.sampler = (
            None
            if num_clients is None
            else PartitionSampler(num_clients, clients_per_round or num_clients, seed)
        )

        self.validator = ReplyValidator(
            max_update_norm,
            max_reply_bytes,
            expected_quantization,
            partitions=self.sampler is not None,
            weight_key=weighted_by_key,
            arrays_key=arrayrecord_key,
        )
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
    def byzantine_ids(self) -> frozenset[int]:
        return frozenset() if self.omniscient is None else self.omniscient.byzantine_ids

    beta = _part("block_step", "beta")
    selector = _part("block_step", "selector")
    memory_kind = _part("block_step", "memory_kind")
    server_lr = _part("server_opt", "lr")
    momentum = _part("server_opt", "momentum")
    nesterov = _part("server_opt", "nesterov")
    adversary = _part("omniscient", "attack")
    max_update_norm = _part("validator", "max_update_norm", settable=True)
    expected_quantization = _part("validator", "expected_quantization", settable=True)
    own_clients = _part("validator", "own_clients", settable=True)

    # ----------------------------------------------------------------------------- state
    def set_node_map(self, node_to_partition: dict[int, int]) -> None:
        """fedbgmd's engines: which node serves which partition (clients are partitions)."""
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
        super().summary()
        block = f"block (beta {self.beta}, {self.selector}, memory {self.memory_kind})"
        flwr_log(
            INFO,
            "\t└──> %s, %s, weighted %s; server lr %s, momentum %s; clients are %s",
            self.aggregator,
            block if self.block else "full dimension",
            self.weighted,
            self.server_lr,
            self.momentum,
            "partitions" if self.sampler is not None else "nodes",
        )

    def sample_partitions(self, server_round: int) -> list[int]:
        """Seeded draw of this round's partitions (same draw on every engine)."""
        assert self.sampler is not None, "clients are nodes: no partitions to draw"
        return self.sampler.sample(server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        if self.fraction_train == 0.0:
            return []
        if not self.model.ready:  # first round (or first round after a resume)
            self.model.adopt(arrays)
        values = {**dict(config), "server-round": server_round}
        lr = None
        if self.client_lr is not None:  # fedbgmd's engines: the schedule sets the round's lr
            if "lr" in config:
                raise ValueError("train_config has 'lr' and the strategy a client_lr schedule")
            lr = values["lr"] = float(self.client_lr(server_round))
        if self.model_by_reference:
            values[MODEL_REF_KEY] = self.model.share()
            arrays = ArrayRecord()  # a placeholder: the reference stands for the model
        clients, info = self._sample(server_round, grid)
        content = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord(values)}
        )
        msgs = [Message(content, node, "train", group_id=str(server_round)) for node in clients]
        self.round_info[server_round] = {
            "t_start": t0,
            **info,
            "clients": clients,
            "lr": lr,
            "bytes_down": len(msgs) * self.model.nbytes,  # payload, as bytes_up
            "sent": len(msgs),
            "sent_nodes": list(clients),
        }
        self._t_sent = time.perf_counter()
        return msgs

    def _sample(self, server_round: int, grid: Grid) -> tuple[dict[int, int], dict[str, Any]]:
        """This round's clients as {node id: client id} (and what to record about the draw)."""
        if self.sampler is None:  # the grid's nodes, as FedAvg samples them, seeded
            nodes = sample_nodes(
                grid,
                server_round,
                self.seed,
                self.fraction_train,
                self.min_train_nodes,
                self.min_available_nodes,
            )
            return {n: n for n in nodes}, {}
        partition_to_node = {p: n for n, p in self.node_to_partition.items()}
        chosen = self.sample_partitions(server_round)
        missing = [p for p in chosen if p not in partition_to_node]
        if missing:
            log.warning("round %d: no node serves partitions %s", server_round, missing)
        clients = {partition_to_node[p]: p for p in chosen if p in partition_to_node}
        return clients, {"sampled": chosen, "missing_nodes": len(missing)}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Algorithm 3, server side; the bookkeeping (timing, counters, log) is in the helpers."""
        info = self.round_info.setdefault(server_round, {"t_start": self._t_sent})
        info["transport_s"] = time.perf_counter() - self._t_sent
        if not self.model.ready:  # no configure_train this run (nothing was sent)
            return None, None
        verdict, G = self._receive(server_round, info, list(replies))  # G_t: a row per client
        if G is None:
            return self._skip(
                server_round,
                info,
                f"{len(verdict.accepted)} accepted replies < min_replies={self.min_replies}",
                check_model=not verdict.accepted
                and bool(verdict.reasons.keys() & {"non_finite", "bad_metrics"}),
            )
        weights = self._weights(verdict) if self.weighted else None
        self._sync()
        t_agg = time.perf_counter()
        try:  # g̃_t = AGG(Δ_t), Δ_t = C_k(P_t), P_t = γG_t + M_t, M_{t+1} = P_t − Δ_t
            g_tilde, diag = self.aggregate_updates(G, verdict.ids, server_round, weights)
        except AggregationRefused as err:  # Krum/Bulyan with too few rows this round, ...
            # (anything else a plug-in raises is a bug: it ends the run, see fedbgmd.core.errors)
            info["agg_time_s"] = time.perf_counter() - t_agg
            return self._skip(server_round, info, f"aggregation refused: {err}", timed=True)
        self.model.x = self.server_opt.step(self.model.x, g_tilde)  # x_{t+1} = x_t − g̃_t
        return self._close_round(server_round, info, verdict, diag, t_agg)

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
        evaluate_fn: EvaluateFn | None = None,
        start_round: int = 1,
    ) -> Result:
        """Flower's round loop (``Strategy.start``: same sequence, log and Result), able to
        continue from ``start_round`` (a resumed run) and to stop on divergence."""
        return run_rounds(
            self,
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn,
            start_round,
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's aggregation of the evaluation metrics, over the replies that carry one
        MetricRecord with a valid ``weighted_by_key``; the others are counted by reason and
        logged (a hostile evaluate reply must not end the run, as it would in FedAvg)."""
        ok, reasons = self.validator.evaluate_replies(list(replies))
        if reasons:
            log.warning(
                "round %d: %d evaluate replies rejected (%s)",
                server_round,
                sum(reasons.values()),
                ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())),
            )
        if not ok:
            return None
        try:
            return self.evaluate_metrics_aggr_fn(ok, self.weighted_by_key)
        except Exception as err:  # clients' claims (e.g. weights summing to 0): log, go on
            log.warning("round %d: evaluate metrics not aggregated (%s)", server_round, err)
            return None

    # ----------------------------------------------------------------------------- helpers
    def _receive(
        self, server_round: int, info: dict[str, Any], replies: list[Message]
    ) -> tuple[Verdict, torch.Tensor | None]:
        """The validated replies and G_t (n, d) on the device, the omniscient adversary's rows
        written in; G_t is None below ``min_replies`` accepted replies."""
        verdict = self.validator.validate(replies, self.model, self._client_of(info))
        DEVICE_STORE.clear()  # device references of rejected replies are dropped here
        updates = self._byzantine_rows(verdict, server_round)
        self._count_rejections(server_round, info, verdict, replies)
        if len(verdict.accepted) < self.min_replies:
            return verdict, None
        if updates is None:
            updates = stack_rows([u for _, u, _ in verdict.accepted]).to(self.device)
        return verdict, updates

    def _close_round(
        self,
        server_round: int,
        info: dict[str, Any],
        verdict: Verdict,
        diag: dict[str, float],
        t_agg: float,
    ) -> tuple[ArrayRecord, MetricRecord]:
        """After the step: divergence, diagnostics and counters, the new model and metrics."""
        self._sync()
        self._check_divergence(server_round, info)
        info["agg_time_s"] = time.perf_counter() - t_agg
        self._count_overflow(server_round, info, verdict, int(diag.pop("memory_overflowed", 0)))
        info.update(diag)
        if diag.get("rows_dropped"):
            log.warning(
                "round %d: the aggregator dropped %d accepted rows",
                server_round,
                diag["rows_dropped"],
            )
        losses = [m["train-loss"] for _, _, m in verdict.accepted if "train-loss" in m]
        info["train_loss"] = median_of_claims(losses) if losses else None
        new = ArrayRecord() if self.model_by_reference else self.model.to_arrays()
        return new, self._train_metrics(server_round, info, verdict)

    def _client_of(self, info: dict[str, Any]) -> Callable[[int], int | None]:
        """Node id -> the client it was asked as this round (None: not asked)."""
        clients: dict[int, int] | None = info.get("clients")
        if clients is None:  # no configure_train for this round: any mapped node
            return self.node_to_partition.get
        return clients.get

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
        sizes, key = self.partition_sizes, self.weighted_by_key
        return torch.tensor(
            [m[key] if sizes is None else sizes[c] for c, _, m in verdict.accepted],
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
        flwr_log(
            INFO,
            "aggregate_train: %s replies accepted, %s rejected",
            len(verdict.accepted),
            sum(reasons.values()),
        )
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

    def _train_metrics(
        self, server_round: int, info: dict[str, Any], verdict: Verdict | None
    ) -> MetricRecord:
        claims = [] if verdict is None else [m for _, _, m in verdict.accepted]
        return train_metrics(
            server_round, info, claims, self.train_metrics_aggr_fn, self.weighted_by_key
        )

    def _skip(
        self,
        server_round: int,
        info: dict[str, Any],
        why: str,
        *,
        check_model: bool = False,
        timed: bool = False,
    ) -> tuple[None, MetricRecord]:
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
        return None, self._train_metrics(server_round, info, None)

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
        "agg_iterations": float(res.iterations),
        "agg_converged": float(res.converged),
    }
    if res.n_dropped:  # accepted rows the aggregator still dropped (non-finite after weighting)
        diag["rows_dropped"] = float(res.n_dropped)
    diag.update({k: float(v) for k, v in (res.extra or {}).items()})
    return diag


__all__ = ["RobustStrategy", "median_of_claims", "row_rejections"]
