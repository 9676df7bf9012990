"""Engines that execute the ServerApp and ClientApp.

- ``simulation``: Flower's Simulation Runtime (Ray) through ``flwr.simulation.run_simulation``.
  Chosen over ``flwr run`` because it runs in this process: the apps are built from the Hydra
  config object directly (``flwr run`` accepts only flat scalar run-config values), no detached
  SuperLink is left running after the run (``flwr run`` starts one and has no stop command), and
  the run's status is known here (``flwr run --stream`` exits 0 even when the run failed).
  The price is a DEPRECATED warning from Flower, which we filter from the output.
- ``inprocess``: :class:`InProcessGrid`, an implementation of Flower's public ``Grid`` interface
  that hands each Message to the ClientApp in this process, with one ``Context`` per node that
  persists across rounds. Same apps, same seeds, same metrics; no Ray start-up, no actors.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID as SERVER_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedbgmd.wire import SAME_PROCESS_KEY

log = logging.getLogger("fedbgmd")

RUN_ID = 1
BatchFn = Callable[[list[Message], list[Context]], list[Message]]


def set_server_identity(run_id: int = RUN_ID) -> None:
    """Flower's Message constructor reads the process's task identity; the runtimes set it,
    so an in-process driver must too."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (sequential, deterministic).

    Node ids are fixed (``1000 + partition id``) and each node has a persistent Context whose
    ``node_config`` carries ``partition-id`` and ``num-partitions`` like Flower's simulation
    (and, with ``by_reference``, the flag that lets the ClientApp reply by device reference).
    A ClientApp exception becomes an error reply (as in Flower), never a crash of the server.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict | None = None,
        batch_fn: BatchFn | None = None,
        by_reference: bool = False,
    ):
        self.client_app = client_app
        self.batch_fn = batch_fn
        node_config: dict[str, Any] = {"num-partitions": num_nodes}
        if by_reference:  # replies may be device references (fedbgmd.wire.DEVICE_STORE)
            node_config[SAME_PROCESS_KEY] = True
        self.contexts = {
            1000 + pid: Context(
                run_id=RUN_ID,
                node_id=1000 + pid,
                node_config={"partition-id": pid, **node_config},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for msg in msgs:
            md = msg.metadata.__dict__
            md["_message_id"], md["_run_id"], md["_src_node_id"] = (
                uuid.uuid4().hex,
                RUN_ID,
                SERVER_NODE_ID,
            )
        replies = self._deliver_batch(msgs) if self._batchable(msgs) else None
        if replies is None:
            replies = [self._deliver(msg) for msg in msgs]
        for msg, reply in zip(msgs, replies):
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[msg.metadata.message_id] = reply
        return [msg.metadata.message_id for msg in msgs]

    def _batchable(self, msgs: list[Message]) -> bool:
        return (
            self.batch_fn is not None
            and len(msgs) > 1
            and all(m.metadata.message_type == "train" for m in msgs)
            and all(m.metadata.dst_node_id in self.contexts for m in msgs)
        )

    def _deliver_batch(self, msgs: list[Message]) -> list[Message] | None:
        """All train messages of a round in one call of ``batch_fn`` (batched client training).

        If the batched call fails, every message is delivered on its own instead, so a failing
        client still gets its own error reply and the others are unaffected.
        """
        assert self.batch_fn is not None
        try:
            return self.batch_fn(msgs, [self.contexts[m.metadata.dst_node_id] for m in msgs])
        except Exception as err:
            log.warning("batched client training failed (%r); delivering one by one", err)
            return None

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts.get(msg.metadata.dst_node_id)
        if context is None:
            return Message(Error(code=1, reason="unknown destination node"), reply_to=msg)
        try:
            return self.client_app(msg, context)
        except Exception as err:  # a crashing client is an error reply, as in Flower
            log.warning("ClientApp on node %s raised %r", msg.metadata.dst_node_id, err)
            return Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(cfg: Any, run_dir: Path) -> Any:
    """Server and clients in this process (no Ray); returns the ServerRun."""
    from fedbgmd.clients.honest import make_client_app, runtime_for
    from fedbgmd.config import to_typed
    from fedbgmd.server import ServerRun

    cfg = to_typed(cfg)  # the checked config, typed once for the server and the clients
    set_server_identity()
    by_reference = bool(cfg.engine.device_resident)  # model and replies (decided once, here)
    batch_fn = None
    if cfg.engine.batched:
        runtime = runtime_for(cfg)

        def batch_fn(msgs: list[Message], contexts: list[Context]) -> list[Message]:
            return runtime.train_many(msgs, contexts, device_ref=by_reference)

    grid = InProcessGrid(
        make_client_app(cfg), cfg.num_clients, batch_fn=batch_fn, by_reference=by_reference
    )
    server = ServerRun(cfg, run_dir, parallelism=1, model_by_reference=by_reference)
    server.run(grid)
    return server


def run_ray_simulation(cfg: Any, run_dir: Path) -> Any:
    """Flower's simulation runtime; returns the ServerRun (raises if the ServerApp failed)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedbgmd.clients.honest import make_client_app
    from fedbgmd.config import to_typed
    from fedbgmd.server import make_server_app

    cfg = to_typed(cfg)  # pickled to the Ray workers as plain dataclasses
    cpus = os.cpu_count() or 1
    parallelism = max(1, min(cfg.num_clients, int(cpus // max(cfg.engine.num_cpus, 1e-9))))
    server_app, state = make_server_app(cfg, run_dir, parallelism)
    backend_config = {
        "client_resources": {
            "num_cpus": float(cfg.engine.num_cpus),
            "num_gpus": float(cfg.engine.num_gpus),
        },
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": cfg.engine.verbose},
    }
    t0 = time.time()
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,
        verbose_logging=cfg.engine.verbose,
    )
    _shutdown_ray()
    run = state.get("run")
    if run is None:
        raise RuntimeError(f"the ServerApp did not start (after {time.time() - t0:.1f}s)")
    return run


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
        pass
