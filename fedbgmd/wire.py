"""What travels between ClientApp and ServerApp: a flat update, optionally quantized and packed.

A train reply's content is a RecordDict with
- ``"update"``: ArrayRecord with key ``"update"`` (float32, shape (d,)) when unquantized, or keys
  ``"packed"`` (the integer levels, packed) and ``"scale"`` when quantized;
- ``"quant"``: ConfigRecord ``{"method", "bits", "numel"}`` (method "none" when unquantized);
- ``"metrics"``: MetricRecord ``{"num-examples", "train-loss", "partition-id", "client-time-s"}``.

A standard Flower reply is also accepted: ``{"arrays": the trained weights y, "metrics": {...,
"num-examples"}}`` (:func:`decode_weights` forms the update x_t − y on the server). Which of the
two a reply is, is read from what it carries (:func:`is_compact`).

Decoding is where the server's defences start: :func:`decode_update` and :func:`decode_weights`
raise :class:`BadReply` with a short machine-readable reason and a detail that names what is
missing or wrong, for anything that is not exactly what was expected.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues

from fedbgmd.core import FlatSpec, QuantizedTensor, dequantize, quantize
from fedbgmd.core.quantization import num_buckets

UPDATE_KEY = "update"
QUANT_KEY = "quant"
METRICS_KEY = "metrics"
REQUIRED_METRICS = ("num-examples", "train-loss", "partition-id", "client-time-s")
# node_config key the in-process engine sets on its nodes (engine.device_resident): the node runs
# in the server's process, so its ClientApp may reply with a DEVICE_STORE reference. A reference
# from anywhere else is unknown to the server and the reply is rejected (missing_key).
SAME_PROCESS_KEY = "fedbgmd-same-process"
# train-config key: the global model is DEVICE_STORE.shared(<value>), the "arrays" record is empty
MODEL_REF_KEY = "model-ref"


class BadReply(ValueError):
    """A reply the server refuses; ``reason`` is a short label counted in the round's metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DeviceStore:
    """In-process hand-over of tensors that stay on their device (the in-process engine only).

    A reply carries a reference instead of the bytes, so a GPU update goes from the client's
    training to the server's aggregation without a round trip through host memory. A reference
    can be taken once; what nobody took is dropped by :meth:`clear` at the end of each round.
    The global model travels the other way the same way (:meth:`share`, read by every client).
    """

    def __init__(self) -> None:
        self._items: dict[str, torch.Tensor] = {}
        self._shared: dict[str, torch.Tensor] = {}

    def put(self, tensor: torch.Tensor) -> str:
        key = uuid.uuid4().hex
        self._items[key] = tensor
        return key

    def take(self, key: object) -> torch.Tensor:
        if not isinstance(key, str) or key not in self._items:
            raise BadReply("missing_key", "unknown device reference")
        return self._items.pop(key)

    def share(self, tensor: torch.Tensor) -> str:
        """A reference every client of the round may read (the global model, server -> clients).

        Readers must not modify the tensor; it is dropped by :meth:`clear` like the rest."""
        key = uuid.uuid4().hex
        self._shared[key] = tensor
        return key

    def nbytes(self, key: object) -> int:
        """Bytes of the tensor a reply's reference stands for (0 for an unknown reference)."""
        t = self._items.get(key) if isinstance(key, str) else None
        return 0 if t is None else t.numel() * t.element_size()

    def shared(self, key: object) -> torch.Tensor:
        if not isinstance(key, str) or key not in self._shared:
            raise LookupError(f"unknown model reference {key!r} (not in the server's process?)")
        return self._shared[key]

    def clear(self) -> None:
        self._items.clear()
        self._shared.clear()


DEVICE_STORE = DeviceStore()


def encode_update(
    update: torch.Tensor,
    *,
    method: str = "none",
    bits: int = 8,
    generator: torch.Generator | None = None,
    device_ref: bool = False,
    bucket_size: int | None = None,
) -> tuple[dict[str, np.ndarray], ConfigRecord]:
    """Turn a flat update into named arrays (quantized and packed when ``method`` != none).

    With ``device_ref`` (in-process engine, no quantization) the tensor stays where it is and
    the record carries a reference into :data:`DEVICE_STORE` instead of the bytes.
    """
    flat = update.detach().reshape(-1)
    if device_ref and method == "none":
        ref = DEVICE_STORE.put(flat.to(torch.float32))
        record: dict[str, ConfigRecordValues] = {
            "method": "device",
            "bits": 32,
            "numel": int(flat.numel()),
            "ref": ref,
        }
        return {}, ConfigRecord(record)
    if method == "sign":
        bits = 1  # sign quantization is 1 bit per coordinate whatever `bits` says
    if method == "none":
        arrays = {"update": flat.to(torch.float32).cpu().numpy()}
    else:
        bucket = bucket_size if method == "qsgd" else None  # sign has one scale
        q = quantize(flat, bits=bits, method=method, generator=generator, bucket_size=bucket)
        arrays = {"packed": q.data.cpu().numpy(), "scale": q.scale.reshape(-1).cpu().numpy()}
    record = {"method": method, "bits": int(bits), "numel": int(flat.numel())}
    if method == "qsgd" and bucket_size is not None:
        record["bucket_size"] = int(bucket_size)  # absent: one norm for the whole update
    return arrays, ConfigRecord(record)


def build_reply_content(
    arrays: dict[str, np.ndarray], quant: ConfigRecord, metrics: dict[str, Any]
) -> RecordDict:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict(
        {UPDATE_KEY: record, QUANT_KEY: quant, METRICS_KEY: MetricRecord(dict(metrics))}
    )


def _split(
    content: RecordDict,
) -> tuple[dict[str, ArrayRecord], dict[str, ConfigRecord], dict[str, MetricRecord]]:
    """The content's array, config and metric records in one pass.

    Flower builds a fresh typed view on every ``content.array_records`` (etc.) access, ~50 µs
    each; a reply used to pay for nine of them."""
    arrays: dict[str, ArrayRecord] = {}
    configs: dict[str, ConfigRecord] = {}
    metrics: dict[str, MetricRecord] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays[key] = record
        elif isinstance(record, ConfigRecord):
            configs[key] = record
        elif isinstance(record, MetricRecord):
            metrics[key] = record
    return arrays, configs, metrics


def reply_nbytes(content: RecordDict) -> int:
    """Payload bytes of a reply's arrays that arrived (what the update cost; ``bytes_up``).

    An array whose bytes hold its declared shape and dtype plus at most a header counts as
    element count x item size (the payload, as ``bytes_down``); any other counts its raw bytes,
    so a claimed shape never counts more than arrived ((2^40,) used to count 4.4e12 bytes). A
    device reference counts as the tensor it refers to (nothing for an unknown reference)."""
    array_records, configs, _ = _split(content)
    quant = configs.get(QUANT_KEY)
    total = 0
    if quant is not None and quant.get("method") == "device":
        total += DEVICE_STORE.nbytes(quant.get("ref"))
    for record in array_records.values():
        for arr in record.values():
            total += _payload_nbytes(arr)
    return total


_NPY_HEADER_MAX = 128  # the .npy header Flower writes for a 1-D array (np.save pads it to 128)


def _payload_nbytes(arr: Array) -> int:
    arrived = len(arr.data) if isinstance(arr.data, bytes) else 0
    dtype = _parse_dtype(arr.dtype)
    shape = arr.shape
    if dtype is None or not (
        isinstance(shape, (list, tuple))
        and len(shape) <= 8
        and all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        return arrived
    claimed = math.prod(shape) * dtype.itemsize
    return claimed if 0 <= arrived - claimed <= _NPY_HEADER_MAX else arrived


# The only dtype strings a reply may carry (Flower writes str(ndarray.dtype)); checked before
# numpy parses anything: np.dtype() of a 12 MB string took 15.9 s and +815 MB before rejecting.
_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "uint8": np.dtype(np.uint8)}


def _parse_dtype(name: object) -> np.dtype | None:
    """The dtype for an allowed dtype string, else None (the wire uses float32 and uint8)."""
    return _DTYPES.get(name) if isinstance(name, str) else None


_ITEM_OVERHEAD = 8  # per key and per scalar, so a reply of many empty items is bounded too


def reply_size(content: RecordDict, limit: int) -> int:
    """Bytes of the whole reply, as far as counted: every record's key, every array's data,
    dtype, stype and shape, every config value (strings, bytes, lists) and metric list. Counting
    stops once past ``limit`` (a hostile reply may hold 100,000 arrays or 88 MB of strings)."""
    total = 0
    for key, record in content.items():
        total += _ITEM_OVERHEAD + len(key)
        for name, value in record.items():
            total += _ITEM_OVERHEAD + len(name)
            if isinstance(value, Array):
                total += _sized(value.data) + _sized(value.dtype) + _sized(value.stype)
                total += _sized(value.shape)
            else:
                total += _sized(value)
            if total > limit:
                return total
    return total


def _sized(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        n = _ITEM_OVERHEAD * len(value)
        if value and isinstance(value[0], (str, bytes)):
            n += sum(len(v) for v in value if isinstance(v, (str, bytes)))
        return n
    return _ITEM_OVERHEAD


def _expect_array(record: ArrayRecord, key: str, dtype: np.dtype, numel: int | None) -> np.ndarray:
    if key not in record:
        raise BadReply("missing_key", f"array {key!r} absent")
    arr = record[key]
    if _parse_dtype(arr.dtype) != dtype:
        raise BadReply("wrong_dtype", f"{key}: {arr.dtype!r}, expected {dtype}")
    if len(arr.shape) != 1 or (numel is not None and arr.shape[0] != numel):
        raise BadReply("wrong_shape", f"{key}: shape {tuple(arr.shape)}, expected ({numel},)")
    try:
        out = arr.numpy()
    except Exception as err:  # hostile bytes that do not deserialise
        raise BadReply("undecodable", f"{key}: {err}") from err
    if out.dtype != dtype or out.shape != tuple(arr.shape):
        raise BadReply("wrong_size", f"{key}: payload does not match its declared shape/dtype")
    return out


NON_FINITE_DETAIL = "update contains NaN or Inf"
MAX_COUNT = 2**31 - 1
MAX_CLIENT_TIME_S = 1e6  # 11.6 days of local training; beyond it a claim, not a measurement


def _as_configured(
    method: object, bits: object, bucket: object, quantization: tuple[Any, ...]
) -> bool:
    """``quantization`` = (method, bits) or (method, bits, qsgd bucket size or None)."""
    want, want_bits = quantization[0], quantization[1]
    if want == "none":
        return method in ("none", "device")
    if len(quantization) > 2 and want == "qsgd" and bucket != quantization[2]:
        return False
    return method == want and bits == want_bits  # the config holds sign quantization to 1 bit


def decode_update(
    content: RecordDict,
    dim: int,
    max_bytes: int,
    quantization: tuple[Any, ...] | None = None,
    required: Sequence[str] = REQUIRED_METRICS,
) -> tuple[torch.Tensor, dict]:
    """Validate a reply and return (flat float32 update of length ``dim``, its metrics).

    Raises :class:`BadReply` for a reply larger than ``max_bytes`` as a whole (:func:`reply_size`,
    checked before anything is parsed), missing records or keys, extra keys, wrong dtype (an
    allow-list) or shape, unknown quantizer settings, quantizer settings other than
    ``quantization`` (the run's ``(method, bits[, bucket_size])``; an unquantized update may come as a device
    reference), or bad metrics (:func:`check_metrics`; ``required``: the metrics that must be
    there). Finiteness is
    not checked here: the server checks every decoded update of a round at once
    (:func:`fedbgmd.core.all_finite_each`, one host read) and rejects with ``non_finite`` and
    :data:`NON_FINITE_DETAIL`.
    """
    _check_size(content, max_bytes)
    array_records, configs, metric_records = _split(content)
    if METRICS_KEY not in metric_records or QUANT_KEY not in configs:
        raise BadReply(
            "missing_record",
            f"a compact update needs a {METRICS_KEY!r} MetricRecord and a {QUANT_KEY!r} "
            f"ConfigRecord; the reply has {_names(content)}",
        )
    metrics = dict(metric_records[METRICS_KEY])
    check_metrics(metrics, required)
    if UPDATE_KEY not in array_records:
        raise BadReply(
            "missing_record", f"no {UPDATE_KEY!r} ArrayRecord; the reply has {_names(content)}"
        )
    record = array_records[UPDATE_KEY]
    quant = dict(configs[QUANT_KEY])
    method, bits, numel = quant.get("method"), quant.get("bits"), quant.get("numel")
    bucket = quant.get("bucket_size")
    if numel != dim:
        raise BadReply("wrong_shape", f"numel {numel!r}, expected {dim}")
    if quantization is not None and not _as_configured(method, bits, bucket, quantization):
        raise BadReply(
            "bad_quantization",
            f"method={method!r} bits={bits!r} bucket_size={bucket!r}, the run uses "
            f"{' '.join(repr(q) for q in quantization)}",
        )
    if bucket is not None and not (
        method == "qsgd" and isinstance(bucket, int) and 1 <= bucket <= dim
    ):
        raise BadReply("bad_quantization", f"bucket_size={bucket!r} with method={method!r}")
    if method == "device":
        if len(record.keys()):
            raise BadReply("unexpected_keys", f"keys {sorted(record.keys())}")
        vec = DEVICE_STORE.take(quant.get("ref"))
        if vec.dtype != torch.float32 or tuple(vec.shape) != (dim,):
            raise BadReply("wrong_shape", f"device update {vec.dtype} {tuple(vec.shape)}")
    elif method == "none":
        if set(record.keys()) != {"update"}:
            raise BadReply("unexpected_keys", f"keys {sorted(record.keys())}")
        vec = torch.from_numpy(_expect_array(record, "update", np.dtype(np.float32), dim).copy())
    elif method in ("qsgd", "sign") and isinstance(bits, int) and 1 <= bits <= 16:
        if set(record.keys()) != {"packed", "scale"}:
            raise BadReply("unexpected_keys", f"keys {sorted(record.keys())}")
        packed = _expect_array(record, "packed", np.dtype(np.uint8), math.ceil(dim * bits / 8))
        n_scales = num_buckets(dim, bucket) if bucket is not None else 1
        scale = _expect_array(record, "scale", np.dtype(np.float32), n_scales)
        try:
            q = QuantizedTensor(
                data=torch.from_numpy(packed.copy()),
                scale=torch.from_numpy(scale.copy()).reshape(() if bucket is None else (-1,)),
                shape=(dim,),
                bits=bits,
                method=method,
                bucket_size=bucket,
            )
            vec = dequantize(q).reshape(-1).to(torch.float32)
        except (ValueError, RuntimeError) as err:
            raise BadReply("wrong_shape", f"cannot unpack quantized update: {err}") from err
    else:
        raise BadReply("bad_quantization", f"method={method!r} bits={bits!r}")
    return vec, metrics


def is_compact(content: RecordDict) -> bool:
    """True when a reply is fedbgmd's compact update (it carries an ``"update"`` ArrayRecord or a
    ``"quant"`` ConfigRecord), False for anything else (read as a standard Flower reply)."""
    return UPDATE_KEY in content or QUANT_KEY in content


# metrics with a meaning to fedbgmd, checked whenever a reply carries them
_COUNT_METRICS = ("num-examples", "partition-id")


def check_metrics(metrics: dict[str, Any], required: Sequence[str]) -> None:
    """Raise ``bad_metrics`` naming the metric: a ``required`` one absent; a required or known
    one (:data:`REQUIRED_METRICS`) that is not a finite number; a sample count or partition id
    that is not an integer in [0, 2^31) (a fractional partition id was truncated onto another
    partition; a count is a weight that must stay finite in float32); a client time outside
    [0, 1e6] s; another weight key (``required``) below 0."""
    for key in required:
        if key not in metrics:
            raise BadReply("bad_metrics", f"metric {key!r} missing (has {sorted(metrics)[:8]})")
    for key in dict.fromkeys((*required, *REQUIRED_METRICS)):
        if key not in metrics:
            continue
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadReply("bad_metrics", f"metric {key!r} is {type(value).__name__}, not a number")
        if not math.isfinite(float(value)):
            raise BadReply("bad_metrics", f"metric {key!r} is {value!r}, not finite")
        number = float(value)
        if key in _COUNT_METRICS and not (number.is_integer() and 0 <= number <= MAX_COUNT):
            raise BadReply("bad_metrics", f"{key} {value!r} is not an integer in [0, 2^31)")
        if key == "client-time-s" and not 0.0 <= number <= MAX_CLIENT_TIME_S:
            raise BadReply("bad_metrics", f"client-time-s {value!r} not in [0, 1e6]")
        if key not in REQUIRED_METRICS and number < 0:  # another weight key
            raise BadReply("bad_metrics", f"metric {key!r} is {value!r}, below 0")


def decode_weights(
    content: RecordDict,
    x: torch.Tensor,
    spec: FlatSpec,
    max_bytes: int,
    *,
    arrays_key: str = "arrays",
    required: Sequence[str] = ("num-examples",),
) -> tuple[torch.Tensor, dict]:
    """A standard Flower train reply: the trained weights y under ``arrays_key`` (every key of
    the global model's state, each with its dtype and shape) and one MetricRecord. Returns
    (the update x − y as flat float32 on ``x``'s device (the CPU), its metrics).

    Non-float entries (e.g. BatchNorm's batch counters) must be there but are not aggregated:
    the server keeps its own. Rejections as :func:`decode_update`'s (``too_large``,
    ``missing_record``, ``missing_key``, ``unexpected_keys``, ``wrong_dtype``, ``wrong_shape``,
    ``wrong_size``, ``undecodable``, ``bad_metrics``); finiteness is checked by the caller."""
    _check_size(content, max_bytes)
    array_records, _, metric_records = _split(content)
    if arrays_key not in array_records:
        raise BadReply(
            "missing_record",
            f"neither trained weights (an ArrayRecord {arrays_key!r}) nor a compact update "
            f"({UPDATE_KEY!r}/{QUANT_KEY!r}); the reply has {_names(content)}",
        )
    if len(metric_records) != 1:
        raise BadReply(
            "missing_record",
            f"expected one MetricRecord, the reply has {len(metric_records)} "
            f"({sorted(metric_records)[:8]})",
        )
    metrics = dict(next(iter(metric_records.values())))
    check_metrics(metrics, required)
    record = array_records[arrays_key]
    keys = set(record.keys())
    missing = [k for k in spec.keys if k not in keys]
    if missing:
        raise BadReply("missing_key", f"{len(missing)} model arrays absent: {missing[:5]}")
    extra = keys - set(spec.keys)
    if extra:
        raise BadReply("unexpected_keys", f"arrays not in the model: {sorted(extra)[:5]}")
    parts = []
    for key in spec.flat_keys:
        want = str(spec.dtypes[key]).removeprefix("torch.")
        arr = record[key]
        if arr.dtype != want:  # compared as strings: nothing a client sent is parsed yet
            raise BadReply("wrong_dtype", f"{key}: {str(arr.dtype)[:40]!r}, expected {want}")
        if list(arr.shape) != list(spec.shapes[key]):
            raise BadReply(
                "wrong_shape", f"{key}: shape {list(arr.shape)[:8]}, expected {spec.shapes[key]}"
            )
        try:
            out = arr.numpy()
        except Exception as err:  # hostile bytes that do not deserialise
            raise BadReply("undecodable", f"{key}: {err}") from err
        if str(out.dtype) != want or list(out.shape) != list(spec.shapes[key]):
            raise BadReply("wrong_size", f"{key}: payload does not match its declared shape/dtype")
        parts.append(torch.from_numpy(out).reshape(-1))
    y = torch.cat(parts).to(torch.float32)
    return x - y, metrics


def _check_size(content: RecordDict, max_bytes: int) -> None:
    size = reply_size(content, max_bytes)  # the whole reply, before anything is parsed
    if size > max_bytes:
        raise BadReply("too_large", f"more than {max_bytes} bytes (counted {size})")


def _names(content: RecordDict) -> str:
    """The records of a reply, by kind (for rejection details)."""
    kinds = {ArrayRecord: "ArrayRecord", ConfigRecord: "ConfigRecord", MetricRecord: "MetricRecord"}
    names = [
        f"{key!r} ({kinds.get(type(rec), type(rec).__name__)})"
        for key, rec in list(content.items())[:6]
    ]
    return ", ".join(names) or "no records"
