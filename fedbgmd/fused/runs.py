"""One job of a fused group: its per-run pieces (:class:`_Run`) and its run folder and strategy
object (:class:`_Bookkeeping`: rows, summary and plots as a single run writes them)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FLUSH_EVERY = 200  # rounds between writes of a job's buffered metrics rows


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
        from fedbgmd.plugins import build_attack
        from fedbgmd.reporting.writer import RunWriter
        from fedbgmd.server import build_strategy

        self.cfg = cfg
        self.run_dir = run_dir
        self.started = time.time()
        self.versions = versions
        self.writer = RunWriter(run_dir)
        self.attack = build_attack(cfg.attack, cfg.seed, cfg.num_clients)
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
        # end (an interrupted fused job is re-run from its start anyway, see fedbgmd.fused.launcher)
        self.pending.append(row)
        if acc is not None or len(self.pending) >= FLUSH_EVERY:
            self.flush()
        if acc is not None:
            line = _progress_line(row, cfg.num_rounds)
            self.note(line)
            if self.progress:
                print(f"{self.run_dir.name}: {line}", flush=True)

    def note(self, line: str) -> None:
        """Append ``line`` to the job's cli.log, as a single run logs its rounds and outcome
        there (the fused engine's own log is the sweep's: Hydra's multirun log)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.run_dir / "cli.log", "a", encoding="utf-8") as fh:
                fh.write(f"[{stamp}][fedbgmd.fused] {line}\n")
        except OSError as err:  # a log line is not worth failing the job for
            logging.getLogger("fedbgmd").warning("could not write %s: %s", self.run_dir, err)

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
        self.note(f"{status} (fused engine)" + (f": {error}" if error else ""))
        self.writer.write_summary(summary)
        draw_plots(self.cfg, self.run_dir)
