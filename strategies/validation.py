"""ReplyValidator: which train replies enter the aggregation, and why the others do not.

One job: turn a round's reply Messages into accepted ``(client id, update, metrics)`` triples,
ordered by client id, and count every refused reply under a short reason (``BadReply.reason``).
The checks, in order: an error reply (``client_error``), a sender that was not asked
(``unknown_node``), the wire format (:func:`fedbgmd.wire.decode_update`: size, records, keys,
dtype, shape, quantizer, metrics), then over all decoded updates at once finiteness
(``non_finite``; one host read for the round), the claimed partition (``wrong_partition``), a
second reply of one client (``duplicate``) and the norm bound (``norm_too_large``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message

from fedbgmd.components import PluginFailed
from fedbgmd.core import all_finite_each
from fedbgmd.wire import NON_FINITE_DETAIL, BadReply, decode_update, reply_nbytes

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
    """

    max_update_norm: float | None = None
    max_reply_bytes: int | None = None
    expected_quantization: tuple[Any, ...] | None = None
    own_clients: bool = False

    def validate(
        self, replies: Sequence[Message], dim: int, client_of: Callable[[int], int | None]
    ) -> Verdict:
        """Decode and check every reply; ``client_of(node id)`` is the client id a node was
        asked as (None: it was not asked)."""
        max_bytes = self.max_reply_bytes or (8 * dim + 4096)  # 2x a float32 update + headers
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
                    raise BadReply("unknown_node", f"node {node}")
                verdict.bytes_up += reply_nbytes(msg.content)
                vec, metrics = decode_update(
                    msg.content, dim, max_bytes, self.expected_quantization
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
                if int(metrics["partition-id"]) != cid:
                    raise BadReply("wrong_partition", f"claims {metrics['partition-id']}, is {cid}")
                if cid in by_id:
                    raise BadReply("duplicate", f"partition {cid}")
                if self.max_update_norm is not None and vec.norm() > self.max_update_norm:
                    raise BadReply("norm_too_large", f"{float(vec.norm()):.3g}")
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
