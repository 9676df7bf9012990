"""The simulated client: local SGD from the global model, replying with the update x_t − y_i.

One ClientApp serves every node; a node's behaviour is keyed on its ``partition-id`` (from the
node config), never on Flower's random node id. A partition listed as Byzantine corrupts its
data (data attacks), its update (update attacks) or its message (message attacks); with an
omniscient attack it trains honestly and the server's adversary hook replaces its row.

Randomness is derived from (seed, round, partition id), so a round replays identically on any
engine and in any order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbgmd.attacks.base import ClientAttack, call_corrupt_update
from fedbgmd.batched import BatchedTrainer
from fedbgmd.config import (
    AttackConfig,
    ClientConfig,
    Config,
    DataConfig,
    ModelConfig,
    to_typed,
)
from fedbgmd.core import FlatSpec, flatten_state, unflatten_state
from fedbgmd.data import TensorData
from fedbgmd.models import build_model
from fedbgmd.plugins import build_attack, call_plugin
from fedbgmd.seeding import generator
from fedbgmd.training import get_device, local_train
from fedbgmd.wire import (
    DEVICE_STORE,
    MODEL_REF_KEY,
    SAME_PROCESS_KEY,
    build_reply_content,
    encode_update,
)
from fedbgmd.workload import load_data, model_kwargs, optim_config, partitions

log = logging.getLogger("fedbgmd")


@dataclass
class _Job:
    """One client's round in progress."""

    msg: Message
    pid: int
    rnd: int
    lr: float
    attack: ClientAttack | None
    x0: torch.Tensor
    t0: float


Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ClientRuntime:
    """Per-process state of the simulated clients: data, model and attack, built once, lazily.

    Holds no per-client state between rounds, so a node behaves the same whichever process
    (Ray actor or the in-process engine) serves it.
    """

    def __init__(
        self,
        *,
        data: DataConfig,
        model: ModelConfig,
        client: ClientConfig,
        attack: AttackConfig,
        seed: int,
        num_clients: int,
        device: str = "auto",
        batch_chunk: int | None = None,
    ) -> None:
        # each part of the run gets its own sub-config, not the whole config
        self.data_cfg, self.model_cfg = data, model
        self.client_cfg, self.attack_cfg = client, attack
        self.seed, self.num_clients = int(seed), int(num_clients)
        self.device_name, self.batch_chunk = device, batch_chunk
        c, q = client, client.quantization
        # plain copies of what every message reads
        self.steps, self.epochs, self.batch_size = c.local_steps, c.local_epochs, c.batch_size
        self.quant_method, self.quant_bits = str(q.method), int(q.bits)
        self.quant_bucket = None if q.bucket_size is None else int(q.bucket_size)
        self.optim = optim_config(c.optimizer)
        self._x0_cache: tuple[ArrayRecord, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> ClientRuntime:
        """The runtime of a whole run's config: the parts the clients need, split out once."""
        return cls(
            data=cfg.data,
            model=cfg.model,
            client=cfg.client,
            attack=cfg.attack,
            seed=cfg.seed,
            num_clients=cfg.num_clients,
            device=cfg.device,
            batch_chunk=cfg.engine.batch_chunk,
        )

    @cached_property
    def device(self) -> torch.device:
        return get_device(self.device_name)

    @cached_property
    def dataset(self):
        return load_data(self.data_cfg, self.seed)

    @cached_property
    def parts(self) -> list[torch.Tensor]:
        return partitions(self.data_cfg, self.num_clients, self.seed, self.dataset.train.y)

    @cached_property
    def model(self) -> torch.nn.Module:
        ds = self.dataset
        return build_model(
            self.model_cfg.name, ds.num_classes, ds.input_shape, **model_kwargs(self.model_cfg)
        ).to(self.device)

    @cached_property
    def attack(self) -> tuple[frozenset[int], ClientAttack | None]:
        spec = build_attack(self.attack_cfg, self.seed, self.num_clients)
        return frozenset(spec.byzantine_ids), spec.client_attack

    @cached_property
    def flat_spec(self) -> FlatSpec:
        """Key order, shapes and dtypes of the model's state (computed once, not per client)."""
        return flatten_state(self.model.state_dict())[1]

    def _as_state(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model state for flat parameters ``flat`` (non-float buffers kept as they are)."""
        state = self.model.state_dict()
        passthrough = {k: v for k, v in state.items() if not v.is_floating_point()}
        return unflatten_state(flat, self.flat_spec, passthrough=passthrough)

    @cached_property
    def _data_cache(self) -> dict[int, TensorData]:
        return {}

    def local_data(self, pid: int) -> TensorData:
        """The partition's training data, copied to the device once per process."""
        if pid not in self._data_cache:
            self._data_cache[pid] = self.dataset.train.subset(self.parts[pid]).to(self.device)
        return self._data_cache[pid]

    def global_model(self, msg: Message) -> torch.Tensor:
        """x_t as a flat tensor on the device (clients only read it).

        With the in-process engine's ``engine.device_resident`` the train config carries a
        reference to the server's flat model (``MODEL_REF_KEY``) and nothing is decoded.
        Otherwise the ``"arrays"`` record is decoded once per record object: in the in-process
        engine every train message of a round carries the same ArrayRecord (the server builds a
        new one each round), while messages that crossed a process boundary are distinct
        objects and are decoded each.
        """
        ref = _train_config(msg).get(MODEL_REF_KEY)
        if ref is not None:
            return DEVICE_STORE.shared(ref).to(self.device)
        arrays = msg.content["arrays"] if "arrays" in msg.content else None
        if not isinstance(arrays, ArrayRecord):
            raise TypeError("a train message needs the global model as an 'arrays' ArrayRecord")
        cached = self._x0_cache
        if cached is not None and cached[0] is arrays:
            return cached[1]
        x0 = flatten_state(arrays.to_torch_state_dict())[0].to(self.device)
        self._x0_cache = (arrays, x0)  # the record is held, so its id cannot be reused
        return x0

    def _prepare(self, msg: Message, context: Context, x0: torch.Tensor | None = None) -> _Job:
        """Everything a client needs for this round; ``x0`` may be shared by a batch of jobs."""
        t0 = time.perf_counter()
        pid = int(context.node_config["partition-id"])
        conf = _train_config(msg)
        rnd, lr = conf.get("server-round"), conf.get("lr")
        if not isinstance(rnd, int) or not isinstance(lr, (int, float)):
            raise TypeError("a train config needs an integer 'server-round' and a number 'lr'")
        byz, attack = self.attack
        if x0 is None:
            x0 = self.global_model(msg)
        return _Job(
            msg=msg,
            pid=pid,
            rnd=rnd,
            lr=float(lr),
            attack=attack if pid in byz else None,
            x0=x0,
            t0=t0,
        )

    def _transform(self, job: _Job, purpose: str) -> Transform | None:
        if job.attack is None or job.attack.kind != "data":
            return None
        g = generator(self.seed, job.rnd, job.pid, "data", purpose, device="cpu")
        return _data_transform(job.attack, g, self.dataset.num_classes)

    def _batches(self, job: _Job, purpose: str) -> torch.Generator:
        return generator(self.seed, job.rnd, job.pid, "batches", purpose)

    def _local(self, job: _Job, purpose: str = "honest") -> tuple[torch.Tensor, float]:
        """H local steps (or E epochs) from x_t with ``local_train``; returns (x_t − y, loss)."""
        model = self.model
        model.load_state_dict(self._as_state(job.x0))
        res, _ = local_train(
            model,
            self.local_data(job.pid),
            steps=self.steps,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optim=self.optim,
            lr=job.lr,
            generator=self._batches(job, purpose),
            device=self.device,
            transform=self._transform(job, purpose),
        )
        y, _ = flatten_state(model.state_dict())
        return job.x0 - y, res.train_loss

    def _finish(self, job: _Job, update: torch.Tensor, loss: float, device_ref: bool) -> Message:
        """Update/message attacks, quantization and the reply Message."""
        seed, pid, rnd = self.seed, job.pid, job.rnd
        attack = job.attack
        if attack is not None and attack.kind == "update":

            def sample_updates(m: int) -> torch.Tensor:
                return torch.stack([self._local(job, f"sample{j}")[0] for j in range(m)])

            update = call_plugin(
                f"attack {type(attack).__name__}.corrupt_update",
                call_corrupt_update,
                attack,
                update,
                generator=generator(seed, rnd, pid, "attack", device=update.device),
                sample_updates=sample_updates,
                lr=job.lr,
            )
        message_attack = attack is not None and attack.kind == "message"
        arrays, quant = encode_update(
            update,
            method=self.quant_method,
            bits=self.quant_bits,
            bucket_size=self.quant_bucket,
            generator=generator(seed, rnd, pid, "quant", device=update.device),
            device_ref=device_ref and self.quant_method == "none" and not message_attack,
        )
        if message_attack and attack is not None:
            arrays = call_plugin(
                f"attack {type(attack).__name__}.corrupt_arrays",
                attack.corrupt_arrays,
                arrays,
                generator=generator(seed, rnd, pid, "msg"),
            )
        metrics = {
            "num-examples": len(self.parts[pid]),
            "train-loss": float(loss),
            "partition-id": pid,
            "client-time-s": time.perf_counter() - job.t0,
        }
        return Message(build_reply_content(arrays, quant, metrics), reply_to=job.msg)

    def train(self, msg: Message, context: Context, device_ref: bool = False) -> Message:
        """One client's round, as the ClientApp runs it (any engine)."""
        job = self._prepare(msg, context)
        update, loss = self._local(job)
        return self._finish(job, update, loss, device_ref)

    def train_many(
        self, msgs: list[Message], contexts: list[Context], device_ref: bool = True
    ) -> list[Message]:
        """Many clients' rounds at once (the in-process engine's batched mode).

        The local steps of all clients run as one vmapped computation
        (:class:`fedbgmd.batched.BatchedTrainer`) from the same x_t, with each client's own
        data, mini-batches (same generator as :meth:`train`) and data attack; update and message
        attacks and quantization then run per client. Falls back to :meth:`train` per message
        when the batched trainer cannot serve the config (non-SGD, epochs, BatchNorm buffers) or
        the messages do not share one global model. Replies are those :meth:`train` would give
        (bitwise on models without dropout; dropout masks differ, see fedbgmd.batched).
        """
        trainer = self.batched_trainer
        first = msgs[0].content if msgs else None
        same_model = first is not None and all(
            m.content["arrays"] is first["arrays"]
            and m.content["config"].get(MODEL_REF_KEY) == first["config"].get(MODEL_REF_KEY)
            for m in msgs
        )
        if trainer is None or not same_model:
            return [self.train(m, c, device_ref) for m, c in zip(msgs, contexts)]
        x0 = self.global_model(msgs[0])
        jobs = [self._prepare(m, c, x0) for m, c in zip(msgs, contexts)]
        updates, losses = trainer.train(
            x0,
            [self.local_data(j.pid) for j in jobs],
            [self._batches(j, "honest") for j in jobs],
            lr=jobs[0].lr,
            transforms=[self._transform(j, "honest") for j in jobs],
        )
        share = (time.perf_counter() - jobs[0].t0) / len(jobs)
        replies = []
        loss_values = losses.tolist()  # one host read for the batch (on a GPU: one wait, not n)
        for i, job in enumerate(jobs):
            job.t0 = time.perf_counter() - share  # each client is billed its share of the batch
            replies.append(self._finish(job, updates[i], loss_values[i], device_ref))
        return replies

    @cached_property
    def batched_trainer(self) -> BatchedTrainer | None:
        c = self.client_cfg
        if c.local_steps is None:
            return None
        try:
            return BatchedTrainer(
                self.model,
                optim=self.optim,
                batch_size=c.batch_size,
                steps=c.local_steps,
                device=self.device,
                max_chunk=self.batch_chunk,
            )
        except NotImplementedError as err:
            log.warning("batched client training unavailable (%s); using the per-client loop", err)
            return None

    def query(self, msg: Message, context: Context) -> Message:
        """Tell the server which partition this node serves (node ids are random per run)."""
        pid = int(context.node_config["partition-id"])
        content = RecordDict(
            {"node": MetricRecord({"partition-id": pid, "num-examples": len(self.parts[pid])})}
        )
        return Message(content, reply_to=msg)


def _train_config(msg: Message) -> ConfigRecord:
    conf = msg.content["config"] if "config" in msg.content else None
    if not isinstance(conf, ConfigRecord):
        raise TypeError("a train message needs a 'config' ConfigRecord")
    return conf


def _data_transform(
    attack: ClientAttack, g: torch.Generator, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def transform(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return call_plugin(
            f"attack {type(attack).__name__}.corrupt_batch",
            attack.corrupt_batch,
            x,
            y,
            generator=g,
            num_classes=num_classes,
        )

    return transform


_RUNTIMES: dict[str, ClientRuntime] = {}


def config_key(cfg: Config) -> str:
    """The identity of a run's config (a dataclass repr lists every field)."""
    return repr(cfg)


def runtime_for(cfg: Any, key: str | None = None) -> ClientRuntime:
    """One runtime per process and config: data and model are loaded once, whatever the engine
    does with the ClientApp object (Ray may unpickle it afresh for every message)."""
    cfg = to_typed(cfg)
    key = config_key(cfg) if key is None else key
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # a new run in the same process replaces the old one
        _RUNTIMES[key] = ClientRuntime.from_config(cfg)
    return _RUNTIMES[key]


def make_client_app(cfg: Any) -> ClientApp:
    """The ClientApp for a fedbgmd config (shared by every engine), typed once here."""
    app = ClientApp()
    cfg = to_typed(cfg)
    key = config_key(cfg)  # computed once here, shipped with the app

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # a node that shares the server's process may hand its update over by reference
        device_ref = context.node_config.get(SAME_PROCESS_KEY) is True
        return runtime_for(cfg, key).train(msg, context, device_ref=device_ref)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return runtime_for(cfg, key).query(msg, context)

    return app


__all__ = ["ClientRuntime", "make_client_app", "runtime_for"]
