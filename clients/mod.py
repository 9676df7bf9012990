"""A Flower client mod that sends fedbgmd's compact update instead of the trained weights.

``ClientApp(mods=[compact_update_mod()])`` leaves the user's train function as it is (it replies
with the trained weights, Flower's convention) and rewrites its reply: the flat update x_t − y
(the global model it received minus the trained one), quantized and packed when asked (QSGD or
sign, :func:`fedbgmd.wire.encode_update`), with the reply's metrics kept. The fedbgmd strategies
recognise such a reply by its records and validate it as they validate full weights; what it saves
is upload bytes (8-bit QSGD: ~1/4 of float32).

Non-train messages and error replies pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message, MetricRecord

from fedbgmd.core import flatten_state
from fedbgmd.seeding import generator
from fedbgmd.wire import build_reply_content, encode_update

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def compact_update_mod(
    method: str = "qsgd",
    bits: int | None = None,
    bucket_size: int | None = None,
    arrayrecord_key: str = "arrays",
) -> Mod:
    """A mod replying with x_t − y quantized by ``method`` (``qsgd``, ``sign`` or ``none``);
    ``bits`` defaults to 8 for qsgd and 1 for sign (the only width sign has)."""
    if method not in ("qsgd", "sign", "none"):
        raise ValueError(f"method must be 'qsgd', 'sign' or 'none', got {method!r}")
    if bits is None:  # qsgd's 8 bits (~1/4 of float32), sign's one
        bits = 1 if method == "sign" else 8
    if method != "none" and not (
        isinstance(bits, int) and 1 <= bits <= (1 if method == "sign" else 16)
    ):
        raise ValueError(f"bits must be an int in 1..16 (sign: 1), got {bits!r}")
    if bucket_size is not None and not (isinstance(bucket_size, int) and bucket_size >= 1):
        raise ValueError(f"bucket_size must be an int >= 1 or None, got {bucket_size!r}")

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        sent = msg.content[arrayrecord_key]
        trained = [r for r in reply.content.values() if isinstance(r, ArrayRecord)]
        metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
        if not isinstance(sent, ArrayRecord) or len(trained) != 1 or len(metrics) != 1:
            raise ValueError(
                "compact_update_mod needs the global model under "
                f"{arrayrecord_key!r} and a reply with one ArrayRecord and one MetricRecord"
            )
        x, _ = flatten_state(sent.to_torch_state_dict())
        y, _ = flatten_state(trained[0].to_torch_state_dict())
        server_round = (
            msg.content["config"].get("server-round", 0) if "config" in msg.content else 0
        )
        arrays, quant = encode_update(
            x.float() - y.float(),
            method=method,
            bits=bits,
            bucket_size=bucket_size,
            generator=generator(context.node_id, server_round, "quant"),
        )
        values = dict(metrics[0])
        values.setdefault("client-time-s", time.perf_counter() - t0)
        return Message(build_reply_content(arrays, quant, values), reply_to=msg)

    return mod


__all__ = ["compact_update_mod"]
