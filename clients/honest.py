"""The simulated client: local SGD from the global model, replying with the update x_t − y_i.

One ClientApp serves every node; a node's behaviour is keyed on its ``partition-id`` (from the
node config), never on Flower's random node id. A partition listed as Byzantine corrupts its
data (data attacks), its update (update attacks) or its message (message attacks); with an
omniscient attack it trains honestly and the server's adversary hook replaces its row.

Randomness is derived from (seed, round, partition id), so a round replays identically on any
engine and in any order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbgmd.attacks.base import ClientAttack
from fedbgmd.components import (
    build_attack,
    generator,
    load_data,
    model_kwargs,
    optim_config,
    partitions,
)
from fedbgmd.core import flatten_state
from fedbgmd.data import TensorData
from fedbgmd.models import build_model
from fedbgmd.training import get_device, local_train
from fedbgmd.wire import build_reply_content, encode_update


class ClientRuntime:
    """Per-process state of the simulated clients: data, model and attack, built once, lazily.

    Holds no per-client state between rounds, so a node behaves the same whichever process
    (Ray actor or the in-process engine) serves it.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @cached_property
    def device(self) -> torch.device:
        return get_device(self.cfg.device)

    @cached_property
    def dataset(self):
        return load_data(self.cfg)

    @cached_property
    def parts(self) -> list[torch.Tensor]:
        return partitions(self.cfg, self.dataset.train.y)

    @cached_property
    def model(self) -> torch.nn.Module:
        ds = self.dataset
        return build_model(
            self.cfg.model.name, ds.num_classes, ds.input_shape, **model_kwargs(self.cfg)
        ).to(self.device)

    @cached_property
    def attack(self) -> tuple[frozenset[int], ClientAttack | None]:
        spec = build_attack(self.cfg)
        return frozenset(spec.byzantine_ids), spec.client_attack

    @cached_property
    def _local(self) -> dict[int, TensorData]:
        return {}

    def local_data(self, pid: int) -> TensorData:
        """The partition's training data, copied to the device once per process."""
        if pid not in self._local:
            self._local[pid] = self.dataset.train.subset(self.parts[pid]).to(self.device)
        return self._local[pid]

    def train(self, msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        cfg = self.cfg
        pid = int(context.node_config["partition-id"])
        conf = msg.content["config"]
        rnd, lr = int(conf["server-round"]), float(conf["lr"])
        data = self.local_data(pid)
        byz, attack = self.attack
        attack = attack if pid in byz else None
        model = self.model
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x0, _ = flatten_state(model.state_dict())
        x0 = x0.clone()

        def run_local(purpose: str) -> tuple[torch.Tensor, Any]:
            model.load_state_dict(_unflat_like(model, x0))
            transform = None
            if attack is not None and attack.kind == "data":
                g_data = generator(cfg.seed, rnd, pid, "data", purpose, device="cpu")
                transform = _data_transform(attack, g_data, self.dataset.num_classes)
            res, _ = local_train(
                model,
                data,
                steps=cfg.client.local_steps,
                epochs=cfg.client.local_epochs,
                batch_size=cfg.client.batch_size,
                optim=optim_config(cfg),
                lr=lr,
                generator=generator(cfg.seed, rnd, pid, "batches", purpose),
                device=self.device,
                transform=transform,
            )
            y, _ = flatten_state(model.state_dict())
            return x0 - y, res

        update, res = run_local("honest")
        if attack is not None and attack.kind == "update":

            def sample_updates(m: int) -> torch.Tensor:
                return torch.stack([run_local(f"sample{j}")[0] for j in range(m)])

            update = attack.corrupt_update(
                update,
                generator=generator(cfg.seed, rnd, pid, "attack", device=update.device),
                sample_updates=sample_updates,
            )
        q = cfg.client.quantization
        arrays, quant = encode_update(
            update,
            method=q.method,
            bits=q.bits,
            generator=generator(cfg.seed, rnd, pid, "quant", device=update.device),
        )
        if attack is not None and attack.kind == "message":
            arrays = attack.corrupt_arrays(arrays, generator=generator(cfg.seed, rnd, pid, "msg"))
        metrics = {
            "num-examples": int(res.num_examples),
            "train-loss": float(res.train_loss),
            "partition-id": pid,
            "client-time-s": time.perf_counter() - t0,
        }
        return Message(build_reply_content(arrays, quant, metrics), reply_to=msg)

    def query(self, msg: Message, context: Context) -> Message:
        """Tell the server which partition this node serves (node ids are random per run)."""
        pid = int(context.node_config["partition-id"])
        content = RecordDict(
            {"node": MetricRecord({"partition-id": pid, "num-examples": len(self.parts[pid])})}
        )
        return Message(content, reply_to=msg)


def _unflat_like(model: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    from fedbgmd.core import unflatten_state

    state = model.state_dict()
    _, spec = flatten_state(state)
    passthrough = {k: v for k, v in state.items() if not v.is_floating_point()}
    return unflatten_state(flat, spec, passthrough=passthrough)


def _data_transform(
    attack: ClientAttack, g: torch.Generator, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def transform(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attack.corrupt_batch(x, y, generator=g, num_classes=num_classes)

    return transform


_RUNTIMES: dict[str, ClientRuntime] = {}


def config_key(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else repr(cfg)


def runtime_for(cfg: Any, key: str | None = None) -> ClientRuntime:
    """One runtime per process and config: data and model are loaded once, whatever the engine
    does with the ClientApp object (Ray may unpickle it afresh for every message)."""
    key = config_key(cfg) if key is None else key
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # a new run in the same process replaces the old one
        _RUNTIMES[key] = ClientRuntime(cfg)
    return _RUNTIMES[key]


def make_client_app(cfg: Any) -> ClientApp:
    """The ClientApp for a resolved fedbgmd config (shared by every engine)."""
    app = ClientApp()
    key = config_key(cfg)  # computed once here, shipped with the app

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return runtime_for(cfg, key).train(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return runtime_for(cfg, key).query(msg, context)

    return app


__all__ = ["ClientRuntime", "make_client_app", "runtime_for"]
