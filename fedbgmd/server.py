"""The ServerApp: map nodes to partitions, drive the strategy, evaluate, write the run folder.

The same ServerApp runs under every engine (Flower's simulation runtime, the in-process grid).
It writes only into its run folder: ``metrics.csv``/``metrics.jsonl`` row by row as the run
goes, ``summary.json`` at the end (status ``failed`` with the error when something broke), and
the plots. See :mod:`fedbgmd.reporting.writer` for the file formats.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedbgmd.config import clients_per_round, plain, to_typed
from fedbgmd.core import all_finite_each
from fedbgmd.data import Dataset
from fedbgmd.integrity import stop_error, stop_status
from fedbgmd.models import build_model, count_parameters
from fedbgmd.partitions import partition_report, partitioner_spec
from fedbgmd.plugins import build_aggregator, build_attack, locate, resolve_selector
from fedbgmd.reporting.setting import run_labels, setting_from_config
from fedbgmd.reporting.summary import environment_versions, summarize, utc_now_iso, with_segments
from fedbgmd.reporting.writer import (
    PARTITIONS_JSON,
    RunWriter,
    atomic_write_text,
    fs_error,
    read_summary,
)
from fedbgmd.strategies import RobustStrategy
from fedbgmd.training import evaluate, get_device, lr_at
from fedbgmd.workload import load_data, model_kwargs, optim_config, partitions

log = logging.getLogger("fedbgmd")
CHECKPOINT = "checkpoint.pt"


# A fresh flwr-clientapp process imports torch before it answers (~10 s on a small machine): a
# discovery query given less time than that misses nodes that are up.
CLIENTAPP_START_S = 60.0


def discover_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every node which partition it serves (Flower's node ids are random per run).

    Nodes that register late are asked as they appear, until every partition is served or
    ``timeout`` seconds passed; each query waits at least CLIENTAPP_START_S for its answers.
    Never blocks forever. Returns {node id: partition id} for the nodes that answered.
    """
    deadline = time.monotonic() + timeout
    asked: set[int] = set()
    replies: list[Message] = []
    mapping: dict[int, int] = {}
    while len(mapping) < num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            asked.update(new)
            msgs = [Message(RecordDict(), n, "query", group_id="discover") for n in new]
            wait = max(CLIENTAPP_START_S, deadline - time.monotonic())
            replies.extend(grid.send_and_receive(msgs, timeout=wait))
            mapping = _partition_claims(replies, num_clients)
        elif time.monotonic() >= deadline:
            break
        else:
            time.sleep(0.2)
    return mapping


def missing_partitions(mapping: dict[int, int], num_clients: int) -> list[int]:
    return sorted(set(range(num_clients)) - set(mapping.values()))


def _partition_claims(replies: list[Message], num_clients: int) -> dict[int, int]:
    claims: dict[int, list[int]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or "node" not in reply.content.metric_records:
            log.warning("node %s did not report its partition", node)
            continue
        pid = reply.content.metric_records["node"].get("partition-id")
        if not isinstance(pid, int) or isinstance(pid, bool):  # a hostile or broken reply
            log.warning("node %s sent no valid partition id", node)
            continue
        if not 0 <= pid < num_clients:
            log.warning("node %s claims partition %s, outside 0..%d", node, pid, num_clients - 1)
            continue
        claims.setdefault(pid, []).append(node)
    mapping: dict[int, int] = {}
    for pid, nodes in claims.items():
        if len(nodes) > 1:
            # nothing tells the honest node from the impostor (or two misconfigured nodes apart):
            # serve neither rather than let the first to answer take the partition
            log.error("partition %d claimed by nodes %s: none of them takes part", pid, nodes)
            continue
        mapping[nodes[0]] = pid
    return mapping


def rounds_per_epoch(cfg: Any, num_train: int) -> float:
    """Rounds that together consume one pass over the training set (for epoch-based schedules)."""
    c = cfg.client
    if c.local_epochs is not None:
        return 1.0 / float(c.local_epochs)
    per_round = clients_per_round(cfg) * c.batch_size * c.local_steps
    return max(1.0, num_train / per_round)


class ServerRun:
    """Everything the ServerApp does for one run; separated from Flower for testability."""

    def __init__(
        self, cfg: Any, run_dir: Path, parallelism: int = 1, model_by_reference: bool = False
    ) -> None:
        """``cfg``: the run's checked config (typed here once when given as composed).
        ``model_by_reference``: the clients run in this process (the in-process engine with
        ``engine.device_resident``), so the global model goes to them by reference."""
        self.cfg = cfg = to_typed(cfg)
        self.parallelism = parallelism  # clients computing at once (for comm_time_s)
        self.run_dir = Path(run_dir)
        self.device = get_device(cfg.device)
        # a resumed run's earlier segments, read before this one writes anything
        self.previous = _previous_summary(self.run_dir) if cfg.resume else None
        self.writer = RunWriter(self.run_dir, resume=bool(cfg.resume))  # refuses a used folder
        self.started = time.time()
        self.started_at = utc_now_iso()
        self.wall_offset = 0.0  # a resumed run's rows go on from the checkpoint row's time
        self.resumed_after: int | None = None
        self.checkpoint_round: int | None = None
        # taken now: the code that runs is the code imported at the start (a commit made while a
        # long run goes must not be credited with its results)
        self.versions = environment_versions(str(self.device))
        self.dataset = load_data(cfg.data, cfg.seed)
        self.model = build_model(
            cfg.model.name,
            self.dataset.num_classes,
            self.dataset.input_shape,
            seed=cfg.seed,
            **model_kwargs(cfg.model),
        ).to(self.device)
        test = self.dataset.test
        if cfg.max_eval_samples is not None:
            test = test.subset(torch.arange(min(len(test), cfg.max_eval_samples)))
        self.test = test.to(self.device)
        self.attack = build_attack(cfg.attack, cfg.seed, cfg.num_clients)
        self.rpe = rounds_per_epoch(cfg, len(self.dataset.train))
        self.strategy = build_strategy(cfg, self.device, self.attack, self.rpe)
        self.strategy.model_by_reference = model_by_reference
        # what honest clients send, known here without asking them: the sizes of the partitions
        # (the same seeded split the clients make; the weights when strategy.weighted) and the
        # quantizer; replies that claim otherwise are not trusted
        parts = partitions(cfg.data, cfg.num_clients, cfg.seed, self.dataset.train.y)
        self.strategy.partition_sizes = [len(part) for part in parts]
        write_partition_report(cfg, self.run_dir, parts, self.dataset)
        q = cfg.client.quantization
        bucket = q.bucket_size
        self.strategy.expected_quantization = (
            str(q.method),
            int(q.bits),
            None if bucket is None else int(bucket),
        )
        b = cfg.strategy.block
        if b.enabled and b.memory == "mean" and self.attack.byzantine_ids:
            log.warning(
                "strategy.block.memory=mean adds the mean residual of all clients, Byzantine "
                "ones included, to every row; it is not robust (docs/findings.md). "
                "Use per_client for robust runs."
            )
        # the clients run in this process (not remote nodes): a crash of their attack plug-in is
        # a bug that must fail the run, not a reply to reject
        self.strategy.own_clients = cfg.engine.name != "deployment"
        self.traceback: str | None = None  # of the exception that failed the run
        self.last_eval: tuple[float, float] | None = None
        self.diverged_at: int | None = None  # first evaluated round with a non-finite model

    # ------------------------------------------------------------------------------
    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Centralised evaluation + the round's metrics row (Flower calls it after each round)."""
        cfg = self.cfg
        info = self.strategy.round_info.get(server_round, {})
        due = (
            server_round in (0, cfg.num_rounds)
            or server_round % cfg.eval_every == 0
            or bool(info.get("diverged"))  # the last round when the run stops there
            or bool(info.get("check_model"))  # every reply non-finite: is the model?
        )
        t0 = time.perf_counter()
        acc = loss = None
        if due:
            self.model.load_state_dict(self._global_state(arrays))
            loss, acc = evaluate(
                self.model, self.test, batch_size=cfg.eval_batch_size, device=self.device
            )
            self.last_eval = (loss, acc)
            if self.diverged_at is None and not (
                math.isfinite(loss)
                and all(all_finite_each([p.detach() for p in self.model.parameters()]))
            ):
                self.diverged_at = server_round
                if self.strategy.diverged is None:  # finite but overflowing: stop here too
                    self.strategy.diverged = (
                        f"round {server_round}: the global model's test loss is not finite"
                    )
                log.warning(
                    "round %d: the global model diverged (non-finite loss or parameters); clients "
                    "training from it send non-finite losses, which are rejected",
                    server_round,
                )
        eval_s = time.perf_counter() - t0
        now = time.perf_counter()
        round_time = now - info["t_start"] if "t_start" in info else eval_s
        client_s = info.get("client_time_s")
        transport = info.get("transport_s")
        comm = None
        if transport is not None and client_s is not None:
            comm = max(0.0, transport - client_s / self.parallelism)
        row = metrics_row(
            server_round,
            self.rpe,
            info,
            acc=acc,
            loss=loss,
            round_time=round_time,
            comm=comm,
            eval_s=eval_s,
            wall=self.wall_offset + time.time() - self.started,
        )
        self.writer.log_round(row)
        every = cfg.checkpoint_every
        last = server_round == cfg.num_rounds and (every > 0 or cfg.checkpoint_last)
        if server_round > 0 and (last or (every and server_round % every == 0)):
            self.save_checkpoint(server_round, arrays)
        line = _progress_line(row, cfg.num_rounds)
        log.info(line)  # into the run folder's cli.log
        if cfg.progress:
            print(line, flush=True)
        if acc is None or loss is None:
            return None
        return MetricRecord({"accuracy": float(acc), "loss": float(loss)})

    def _global_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global model: the strategy's own copy when the model travels by reference (the
        rounds then pass an empty placeholder record), else decoded from ``arrays``."""
        if self.strategy.model_by_reference and self.strategy.holds_model:
            return self.strategy.global_state()
        return arrays.to_torch_state_dict()

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Global model + strategy state (memory, momentum) after ``server_round``; atomic.

        Every other source of randomness is derived from (seed, round, client id), so this is
        all a resumed run needs to replay the remaining rounds exactly.
        """
        state = {
            "round": server_round,
            "model": {k: v.detach().cpu().clone() for k, v in self._global_state(arrays).items()},
            "strategy": self.strategy.state_dict(),
            "node_map": dict(self.strategy.node_to_partition),
        }
        tmp = self.run_dir / "checkpoint.pt.tmp"
        try:
            with open(tmp, "wb") as fh:  # a file object: write errors stay OSErrors (errno kept)
                torch.save(state, fh)
            os.replace(tmp, self.run_dir / CHECKPOINT)
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # never leave a partial checkpoint behind
            if isinstance(err, OSError):
                raise fs_error(err, "saving the checkpoint", tmp) from err
            raise
        self.checkpoint_round = server_round

    def _resume(self) -> tuple[ArrayRecord, int]:
        """Initial arrays and first round: fresh, or from ``run_dir/checkpoint.pt`` on resume."""
        if not self.cfg.resume:
            return ArrayRecord(self.model.state_dict()), 1
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"resume={self.cfg.resume}: no {CHECKPOINT} in {self.run_dir}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.strategy.load_state_dict(state["strategy"])
        done = int(state["round"])
        self.writer.truncate_after(done)
        self.resumed_after = self.checkpoint_round = done
        kept = [r.get("wall_time_s") for r in self.writer.rows() if r.get("round") == done]
        self.wall_offset = float(kept[-1]) if kept and kept[-1] is not None else 0.0
        log.warning("resuming %s after round %d", self.run_dir, done)
        return ArrayRecord(self.model.state_dict()), done + 1

    def run(self, grid: Grid) -> None:
        cfg = self.cfg
        status, error = "completed", None
        try:
            mapping = discover_nodes(grid, cfg.num_clients, cfg.engine.round_timeout_s)
            missing = missing_partitions(mapping, cfg.num_clients)
            if len(mapping) < cfg.strategy.min_replies:
                raise RuntimeError(
                    f"only {len(mapping)} of {cfg.num_clients} nodes reported a partition within "
                    f"engine.round_timeout_s={cfg.engine.round_timeout_s}s "
                    f"(min_replies={cfg.strategy.min_replies}); no node serves partitions {missing}"
                )
            if missing:
                log.warning(
                    "no node serves partitions %s after %ss: going on with the %d that answered "
                    "(their clients count as not replying)",
                    missing,
                    cfg.engine.round_timeout_s,
                    len(mapping),
                )
            self.strategy.set_node_map(mapping)
            initial, first_round = self._resume()
            self.strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=cfg.num_rounds,
                timeout=cfg.engine.round_timeout_s,
                evaluate_fn=self.evaluate_fn,
                start_round=first_round,
            )
        except BaseException as err:
            status, error = stop_status(err), stop_error(err)
            self.traceback = traceback.format_exc()
            raise
        finally:
            self.finish(status, error)

    def finish(self, status: str, error: str | None) -> None:
        """Write summary.json; when the run already failed, a failure to write it is logged and
        does not hide the run's own error."""
        try:
            self._write_summary(status, error)
        except OSError as err:
            if status == "completed":
                raise
            log.error("could not write summary.json: %s", err)
            return
        self._plots()

    def _write_summary(self, status: str, error: str | None) -> None:

        rows = self.writer.rows()
        summary = summary_fields(
            self.cfg,
            rows,
            status,
            error,
            byzantine_ids=self.attack.byzantine_ids,
            num_parameters=count_parameters(self.model),
            diverged_at=self.diverged_at,
            diverged=self.strategy.diverged,
            versions=self.versions,
        )
        summary.update(
            checkpoint_round=self.checkpoint_round,
            resume_command=(
                f"fedbgmd resume={self.run_dir}" if self.checkpoint_round is not None else None
            ),
        )
        if self.traceback is not None:
            summary["traceback"] = self.traceback
        segment = {
            "started_at": self.started_at,
            "finished_at": utc_now_iso(),
            "status": status,
            "resumed_after_round": self.resumed_after,
            "last_round": summary["rounds"] if rows else None,
            "wall_time_s": time.time() - self.started,
        }
        self.writer.write_summary(with_segments(summary, self.previous, segment))

    def _plots(self) -> None:
        draw_plots(self.cfg, self.run_dir)


def strategy_class(target: str) -> type[RobustStrategy]:
    """The strategy class at dotted path ``target`` (``strategy.target``): a RobustStrategy."""
    cls = locate(target)
    if not (isinstance(cls, type) and issubclass(cls, RobustStrategy)):
        raise TypeError(f"{target} must be a subclass of RobustStrategy")
    return cls


def build_strategy(cfg: Any, device: torch.device, attack: Any, rpe: float) -> Any:
    """The run's strategy object: aggregator, block step, memory kind, server optimiser,
    sampling, the client learning-rate schedule (epochs of ``rpe`` rounds) and the adversary.
    Single runs and fused sweeps build it alike."""
    s = cfg.strategy
    opt = optim_config(cfg.client.optimizer)
    per_epoch = cfg.client.optimizer.schedule_unit == "epoch"

    def client_lr(server_round: int) -> float:
        t = server_round - 1
        return lr_at(opt, int(t // rpe) if per_epoch else t)

    cls = strategy_class(s.target)
    return cls(
        fraction_evaluate=0.0,  # evaluation is centralised (the ServerApp's evaluate_fn)
        aggregator=build_aggregator(s.aggregator),
        num_clients=cfg.num_clients,
        clients_per_round=clients_per_round(cfg),
        seed=cfg.seed,
        device=device,
        block=s.block.enabled,
        beta=s.block.beta,
        selector=resolve_selector(s.block.selector),
        memory=s.block.memory,
        server_lr=s.server_lr,
        server_momentum=s.server_momentum,
        server_nesterov=s.server_nesterov,
        weighted=s.weighted,
        min_replies=s.min_replies,
        max_update_norm=s.max_update_norm,
        stop_on_divergence=cfg.stop_on_divergence,
        client_lr=client_lr,
        adversary=attack.omniscient_attack,
        byzantine_ids=attack.byzantine_ids,
        **dict(s.params),
    )


def metrics_row(
    rnd: int,
    rpe: float,
    info: dict[str, Any],
    *,
    acc: float | None,
    loss: float | None,
    round_time: float,
    comm: float | None,
    eval_s: float,
    wall: float,
) -> dict[str, Any]:
    """One round's metrics row (reporting.writer.METRIC_COLUMNS and the jsonl extras) from the
    strategy's round info and the evaluation; single runs and fused sweeps write it alike."""
    passed = (
        "train_loss", "client_time_s", "agg_time_s", "bytes_up", "bytes_down", "replies_accepted",
        "replies_rejected", "agg_iterations", "agg_converged", "memory_norm", "relative_residual",
    )  # fmt: skip
    return {
        "round": rnd,
        "epoch": rnd / rpe,
        "test_accuracy": acc,
        "test_loss": loss,
        "round_time_s": round_time,
        "comm_time_s": comm,
        "eval_time_s": eval_s,
        "wall_time_s": wall,
        **{k: info.get(k) for k in passed},
        "rejections": info.get("rejections"),
        "skipped": info.get("skipped"),
        "lr": info.get("lr"),
    }


def summary_fields(
    cfg: Any,
    rows: list[dict[str, Any]],
    status: str,
    error: str | None,
    *,
    byzantine_ids: Any,
    num_parameters: int | None,
    diverged_at: int | None,
    diverged: str | None,
    versions: dict[str, Any],
) -> dict[str, Any]:
    """The summary.json fields every run has (single or fused): the metrics' summary, labels,
    outcome, divergence, versions and the config."""
    summary = summarize(rows)
    config = plain(cfg)
    summary.update(run_labels(config))
    summary.update(
        status=status,
        error=error,
        byzantine_ids=list(byzantine_ids),
        num_parameters=num_parameters,
        diverged_at=diverged_at,
        stopped_early=diverged if diverged is not None and cfg.stop_on_divergence else None,
        versions=versions,
        config=config,
    )
    return summary


def draw_plots(cfg: Any, run_dir: Path) -> None:
    """The run's PNGs when ``cfg.plots``; a plotting error never fails a finished run."""
    if not cfg.plots:
        return
    try:
        from fedbgmd.reporting import plots  # matplotlib only when plots are drawn

        plots.plot_run(run_dir)
        if (run_dir / PARTITIONS_JSON).is_file():
            plots.plot_partitions(run_dir)
    except Exception as err:
        log.warning("could not draw plots: %s", err)


def write_partition_report(
    cfg: Any, run_dir: Path, parts: list[torch.Tensor], dataset: Dataset
) -> None:
    """``run_dir/partitions.json``: each client's sample count and class histogram, the
    partitioner and its parameters, and how many samples no client holds (logged when some)."""
    d = cfg.data
    target, params = partitioner_spec(d.partition, d.partitioner.target, d.partitioner.params)
    report = partition_report(parts, dataset.train.y, dataset.num_classes, target, params)
    if report["unassigned"]:
        log.warning(
            "%s leaves %d of %d training samples to no client (see %s)",
            target.rpartition(".")[2],
            report["unassigned"],
            report["num_samples"],
            PARTITIONS_JSON,
        )
    atomic_write_text(Path(run_dir) / PARTITIONS_JSON, json.dumps(report) + "\n")


def _previous_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_summary(run_dir)
    except (OSError, ValueError):  # none (the last segment was killed) or unreadable
        return None


def setting_of(cfg: Any) -> dict[str, Any]:
    """The config choices that define a run (see :mod:`fedbgmd.reporting.setting`)."""
    return setting_from_config(plain(cfg))


def _progress_line(row: dict[str, Any], num_rounds: int) -> str:
    acc = row["test_accuracy"]
    acc_s = "   -  " if acc is None else f"{100 * acc:6.2f}%"
    loss = row["train_loss"]
    loss_s = (
        "-" if loss is None or (isinstance(loss, float) and math.isnan(loss)) else f"{loss:.4f}"
    )
    rej = row["replies_rejected"] or 0
    extra = f"  rejected {rej}" if rej else ""
    if row.get("skipped"):
        extra += "  SKIPPED"
    return (
        f"round {row['round']:>4}/{num_rounds}  test acc {acc_s}  train loss {loss_s}  "
        f"round {row['round_time_s']:.2f}s  agg {row['agg_time_s'] or 0.0:.3f}s  "
        f"elapsed {row['wall_time_s']:.1f}s{extra}"
    )


def make_server_app(cfg: Any, run_dir: Path, parallelism: int = 1) -> tuple[ServerApp, dict]:
    """The ServerApp for a config; ``state['run']`` holds the ServerRun once it started."""
    app = ServerApp()
    state: dict[str, Any] = {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = ServerRun(cfg, run_dir, parallelism)
        state["run"] = run
        run.run(grid)

    return app, state
