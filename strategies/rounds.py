"""Flower's round loop and what a round reports, for the robust strategies.

One job: drive the rounds as Flower's ``Strategy.start`` does (configure_train → send and
receive → aggregate_train → configure_evaluate → send and receive → aggregate_evaluate →
evaluate_fn; Flower's log lines; a ``Result`` with the arrays and per-round metrics), able to
continue from a round (a resumed run) and to stop when the global model diverged; and build a
round's train MetricRecord (the clients' metrics plus fedbgmd's diagnostics).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log as flwr_log

if TYPE_CHECKING:
    from fedbgmd.strategies.robust import RobustStrategy

log = logging.getLogger("fedbgmd")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

# round_info keys reported in the train MetricRecord (as "train-loss", ...)
DIAGNOSTICS = (
    "train_loss", "replies_accepted", "replies_rejected", "agg_iterations", "agg_converged",
    "memory_norm", "relative_residual", "rows_dropped",
)  # fmt: skip


def run_rounds(
    strategy: RobustStrategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord | None,
    evaluate_config: ConfigRecord | None,
    evaluate_fn: EvaluateFn | None,
    start_round: int = 1,
) -> Result:
    """``Strategy.start``'s sequence, log and Result from ``start_round`` (see the module)."""
    flwr_log(INFO, "Starting %s strategy:", type(strategy).__name__)
    log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
    strategy.summary()
    flwr_log(INFO, "")
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result, arrays = Result(), initial_arrays
    t_start = time.time()
    if evaluate_fn is not None and start_round == 1:
        res = evaluate_fn(0, arrays)
        flwr_log(INFO, "Initial global evaluation results: %s", res)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
    for rnd in range(start_round, num_rounds + 1):
        flwr_log(INFO, "")
        flwr_log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        new, metrics = strategy.aggregate_train(rnd, replies)
        if new is not None:
            result.arrays = arrays = new
        if metrics is not None:
            flwr_log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            result.train_metrics_clientapp[rnd] = metrics
        eval_msgs = list(strategy.configure_evaluate(rnd, arrays, evaluate_config, grid))
        if eval_msgs:
            agg = strategy.aggregate_evaluate(
                rnd, grid.send_and_receive(eval_msgs, timeout=timeout)
            )
            if agg is not None:
                flwr_log(INFO, "\t└──> Aggregated MetricRecord: %s", agg)
                result.evaluate_metrics_clientapp[rnd] = agg
        if evaluate_fn is not None:
            flwr_log(INFO, "Global evaluation")
            res = evaluate_fn(rnd, arrays)
            flwr_log(INFO, "\t└──> MetricRecord: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        if strategy.diverged is not None and strategy.stop_on_divergence:
            # every later round would reject all replies (computed from a NaN/Inf model)
            log.warning("%s; stopping the run (stop_on_divergence=true)", strategy.diverged)
            break
    if strategy.model_by_reference and strategy.holds_model:
        result.arrays = strategy.model.to_arrays()  # the rounds passed a placeholder
    flwr_log(INFO, "")
    flwr_log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
    flwr_log(INFO, "Final results:")
    for line in io.StringIO(str(result)):
        flwr_log(INFO, "\t%s", line.rstrip("\n"))
    return result


def train_metrics(
    server_round: int,
    info: dict[str, Any],
    client_metrics: list[dict[str, Any]],
    aggr_fn: Callable[[list[RecordDict], str], MetricRecord],
    weight_key: str,
) -> MetricRecord:
    """The accepted clients' metrics aggregated by ``aggr_fn`` (FedAvg's weighted average by
    default), plus the round's diagnostics from ``info``: train-loss (the median claim), replies
    accepted/rejected and by reason (``rejected-<reason>``), aggregator iterations, memory norm,
    relative residual."""
    out = MetricRecord()
    records = [RecordDict({"metrics": MetricRecord(m)}) for m in client_metrics]
    if records:
        try:
            out = aggr_fn(records, weight_key)
        except Exception as err:  # clients' claims (e.g. weights summing to 0): log, go on
            log.warning("round %d: train metrics not aggregated (%s)", server_round, err)
    for key in DIAGNOSTICS:
        if isinstance(info.get(key), (int, float)):
            out[key.replace("_", "-")] = info[key]
    for reason, n in (info.get("rejections") or {}).items():
        out[f"rejected-{reason.replace('_', '-')}"] = n
    return out
