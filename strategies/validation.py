"""ReplyValidator: which train replies enter the aggregation, and why the others do not.

One job: turn a round's reply Messages into accepted ``(client id, update, metrics)`` triples,
ordered by client id, and count every refused reply under a short reason (``BadReply.reason``).
A reply is either fedbgmd's compact update or a standard Flower reply with the trained weights
(the update x_t − y is formed here), told apart by what it carries (:func:`fedbgmd.wire.is_compact`);
both meet the same checks, in order: an error reply (``client_error``), a sender that was not
asked (``unknown_node``), the format (:func:`fedbgmd.wire.decode_update` /
:func:`~fedbgmd.wire.decode_weights`: size, records, keys, dtype, shape, quantizer, metrics), then
over all decoded updates at once finiteness (``non_finite``; one host read for the round), the
claimed partition when clients are partitions (``wrong_partition``), a second reply of one client
(``duplicate``) and the norm bound (``norm_too_large``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedbgmd.core import all_finite_each
from fedbgmd.plugins import PluginFailed
from fedbgmd.strategies.model import GlobalModel
from fedbgmd.wire import (
    NON_FINITE_DETAIL,
    REQUIRED_METRICS,
    BadReply,
    check_metrics,
    decode_update,
    decode_weights,
    is_compact,
    reply_nbytes,
)

log = logging.getLogger("fedbgmd")


@dataclass
class Verdict:
    """A round's validated replies: ``accepted`` ordered by client id, rejections by reason."""

    accepted: list[tuple[int, torch.Tensor, dict[str, Any]]]
    reasons: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    client_time_s: float = 0.0

    @property
    def ids(self) -> list[int]:
        return [cid for cid, _, _ in self.accepted]

    def drop(self, why: Sequence[str | None]) -> None:
        """Reject the accepted rows whose entry of ``why`` is a reason (``None``: kept)."""
        self.reasons.update(w for w in why if w is not None)
        self.accepted = [a for a, w in zip(self.accepted, why) if w is None]


@dataclass
class ReplyValidator:
    """The server's checks of train replies (see the module docstring).

    Attributes:
        max_update_norm: reject updates whose Euclidean norm is larger (None: no bound).
        max_reply_bytes: reject replies larger than this as a whole (None: 2x a float32 update
            plus 4 KiB of headers).
        expected_quantization: ``(method, bits[, qsgd bucket size])`` every honest client uses;
            other settings are rejected (None: any supported setting).
        own_clients: the clients run in this process (simulation): an error reply saying their
            plug-in crashed is a bug that fails the run, not a reply to reject.
        partitions: clients are fedbgmd's partitions: a reply must carry the metrics of
            :data:`~fedbgmd.wire.REQUIRED_METRICS`, its ``partition-id`` the one it was asked
            for. Otherwise (a standard Flower app) only ``weight_key`` is required.
        weight_key: the metric holding the sample count (Flower's ``weighted_by_key``).
        arrays_key: the ArrayRecord holding a standard reply's trained weights.
    """

    max_update_norm: float | None = None
    max_reply_bytes: int | None = None
    expected_quantization: tuple[Any, ...] | None = None
    own_clients: bool = False
    partitions: bool = True
    weight_key: str = "num-examples"
    arrays_key: str = "arrays"

    @property
    def required_metrics(self) -> tuple[str, ...]:
        if self.partitions:
            return tuple(dict.fromkeys((*REQUIRED_METRICS, self.weight_key)))
        return (self.weight_key,)

    def validate(
        self, replies: Sequence[Message], model: GlobalModel, client_of: Callable[[int], int | None]
    ) -> Verdict:
        """Decode and check every reply against the global model ``model`` (x_t);
        ``client_of(node id)`` is the client id a node was asked as (None: it was not asked)."""
        dim = model.dim
        max_bytes = self.max_reply_bytes or (8 * dim + 4096)  # 2x a float32 update + headers
        # a standard reply: the float32 weights, plus .npy headers and names for every array
        max_weights_bytes = self.max_reply_bytes or (
            8 * dim + 4096 + 512 * len(model.spec.keys if model.spec else ())
        )
        required = self.required_metrics
        x_host: list[torch.Tensor] = []  # x_t on the CPU, read once a round if needed
        verdict = Verdict(accepted=[])
        reasons = verdict.reasons

        def reject(err: BadReply) -> None:
            reasons[err.reason] += 1
            log.debug("rejected reply: %s", err)  # summarised once per round by the strategy

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
                cid = client_of(node)
                if cid is None:
                    raise BadReply("unknown_node", f"node {node} was not asked this round")
                verdict.bytes_up += reply_nbytes(msg.content)
                if is_compact(msg.content):
                    vec, metrics = decode_update(
                        msg.content, dim, max_bytes, self.expected_quantization, required
                    )
                else:
                    if not x_host:
                        assert model.x is not None and model.spec is not None
                        x_host.append(model.x.detach().cpu())
                    vec, metrics = decode_weights(
                        msg.content,
                        x_host[0],
                        model.spec,
                        max_weights_bytes,
                        arrays_key=self.arrays_key,
                        required=required,
                    )
                decoded.append((cid, vec, metrics))
            except BadReply as err:
                reject(err)
            except PluginFailed:
                raise
            except Exception as err:  # a hostile reply must never end the run
                reject(BadReply("undecodable", f"{type(err).__name__}: {err}"))
        finite = all_finite_each([vec for _, vec, _ in decoded])
        by_id: dict[int, tuple[torch.Tensor, dict]] = {}
        client_times: list[float] = []
        for (cid, vec, metrics), ok in zip(decoded, finite):
            try:
                if not ok:
                    raise BadReply("non_finite", NON_FINITE_DETAIL)
                if self.partitions and int(metrics["partition-id"]) != cid:
                    raise BadReply("wrong_partition", f"claims {metrics['partition-id']}, is {cid}")
                if cid in by_id:
                    raise BadReply("duplicate", f"a second reply of client {cid}")
                if self.max_update_norm is not None and vec.norm() > self.max_update_norm:
                    raise BadReply("norm_too_large", f"{float(vec.norm()):.3g}")
                if "client-time-s" in metrics:
                    client_times.append(float(metrics["client-time-s"]))
                by_id[cid] = (vec, metrics)
            except BadReply as err:
                reject(err)
        verdict.accepted = [(cid, *by_id[cid]) for cid in sorted(by_id)]  # order by client id
        # what clients claim is bounded (decode_update) and aggregated robustly: the round's
        # summed client time is estimated as n x the median claim
        if client_times:
            verdict.client_time_s = len(client_times) * median_of_claims(client_times)
        return verdict

    def evaluate_replies(self, replies: Sequence[Message]) -> tuple[list[RecordDict], Counter[str]]:
        """The evaluate replies whose metrics can be aggregated (one MetricRecord, a valid
        ``weight_key``), as ``{"metrics": record}``, and the others counted by reason."""
        ok: list[RecordDict] = []
        reasons: Counter[str] = Counter()
        for msg in replies:
            try:
                if msg.has_error():
                    raise BadReply("client_error", msg.error.reason or "")
                records = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
                if len(records) != 1:
                    raise BadReply("missing_record", f"{len(records)} MetricRecords, expected one")
                check_metrics(dict(records[0]), (self.weight_key,))
                ok.append(RecordDict({"metrics": records[0]}))
            except BadReply as err:
                reasons[err.reason] += 1
                log.debug("rejected evaluate reply: %s", err)
        return ok, reasons

    def row_rejections(self, rows: torch.Tensor) -> list[str | None]:
        """:func:`row_rejections` with this validator's norm bound."""
        return row_rejections(rows, self.max_update_norm)


def row_rejections(rows: torch.Tensor, max_update_norm: float | None) -> list[str | None]:
    """Per row of ``rows`` (m, d), the reason a reply with that update is rejected (``None``:
    accepted), in :meth:`ReplyValidator.validate`'s order: ``non_finite``, then
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
