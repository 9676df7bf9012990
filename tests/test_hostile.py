"""Hostile replies (issue 13): one regression test per hole the fuzzer found in the server, and a
seeded fuzz test of RobustStrategy.aggregate_train with its invariants."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from test_strategy import (
    D,
    flat,
    honest_content,
    initial_arrays,
    make_strategy,
    reply_for,
    run_round,
    send,
    updates,
)

from fedbgmd.engine import set_server_identity
from fedbgmd.wire import build_reply_content, encode_update

FLT_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(autouse=True)
def _server_identity():
    set_server_identity()


def _content(update: torch.Tensor, pid: int, **metrics: float) -> RecordDict:
    arrays, q = encode_update(update)
    base = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.01}
    return build_reply_content(arrays, q, {**base, **metrics})


def _replace(pid: int, make):
    """`extra` entry of run_round: partition pid's reply becomes make(pid)."""
    return {pid: lambda r, m: reply_for(m, make(pid))}


# ------------------------------------------------------------------------ hole 2: divergence
def test_rejected_replies_are_never_divergence():
    # issue 13: two Byzantine clients that made up a round's whole sample sent num-examples=0.5;
    # bad_metrics counted as non-finite and the run was marked diverged with a finite model
    s = make_strategy("gm", n=5, clients_per_round=2, seed=3)
    sampled = s.sample_partitions(1)
    extra = {
        p: lambda r, m, p=p: reply_for(m, _content(torch.zeros(D), p, **{"num-examples": 0.5}))
        for p in sampled
    }
    new, _ = run_round(s, initial_arrays(), updates(), extra=extra)
    info = s.round_info[1]
    assert new is None and info["rejections"] == {"bad_metrics": 2}
    assert s.diverged is None and "diverged" not in info
    assert info["check_model"]  # the server evaluates its own model to decide


def test_a_non_finite_model_is_divergence():
    s = make_strategy("mean")
    ups = updates()
    ups[:] = FLT_MAX  # finite replies whose mean step leaves the model finite (-FLT_MAX)...
    run_round(s, initial_arrays(), ups)
    assert s.diverged is None
    run_round(s, initial_arrays(), ups, rnd=2)  # ...the second overflows it to -inf
    assert s.diverged is not None and s.round_info[2]["diverged"]


# ------------------------------------------------------------------------ hole 3: memory
def test_an_overflowing_memory_row_is_a_rejection_and_the_diagnostics_stay_finite():
    # issue 13: a client sending FLT_MAX twice stored inf in its residual row
    s = make_strategy("gm", block=True, beta=0.25, memory="per_client")
    x = initial_arrays()
    for rnd in (1, 2, 3):
        ups = updates(seed=rnd)
        new, _ = run_round(
            s, x, ups, rnd=rnd, extra=_replace(0, lambda p: _content(torch.full((D,), FLT_MAX), p))
        )
        x = new if new is not None else x
        info = s.round_info[rnd]
        assert math.isfinite(info["memory_norm"]) and math.isfinite(info["relative_residual"])
        assert bool(torch.isfinite(s.block_step.memory.state_dict()["rows"]).all())
    assert s.round_info[2]["rejections"] == {"memory_overflow": 1}
    assert s.round_info[2]["replies_accepted"] == 4 and s.round_info[2]["replies_rejected"] == 1
    assert s.diverged is None and bool(torch.isfinite(flat(x)).all())


# ------------------------------------------------------------------------ holes 4/5: bounds
def _with_record(pid: int, key: str, record) -> RecordDict:
    content = _content(torch.zeros(D), pid)
    content[key] = record
    return content


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _with_record(p, "junk", ConfigRecord({"s": "x" * 100_000})),
        lambda p: _with_record(p, "junk", MetricRecord({"l": [1.0] * 10_000})),
        lambda p: _with_record(
            p,
            "junk",
            ArrayRecord(
                {str(i): Array("float32", (0,), "numpy.ndarray", b"") for i in range(5_000)}
            ),
        ),
        lambda p: _with_record(
            p,
            "quant",
            ConfigRecord({"method": "none", "bits": 8, "numel": D, "pad": "y" * 100_000}),
        ),
    ],
    ids=["config_record", "metric_list", "many_arrays", "quant_key"],
)
def test_a_reply_is_bounded_as_a_whole(make):
    # issue 13: ~88 MB in extra records, an extra quant key or metric lists, or 100k arrays,
    # were accepted (the bound counted the update's array data only)
    s = make_strategy("mean")
    x0, ups = initial_arrays(), updates()
    new, _ = run_round(s, x0, ups, extra=_replace(2, make))
    assert s.round_info[1]["rejections"] == {"too_large": 1}
    torch.testing.assert_close(flat(new), flat(x0) - ups[[0, 1, 3, 4]].mean(0), atol=1e-6, rtol=0)


def test_dtype_strings_are_checked_against_an_allow_list_before_numpy():
    # issue 13: np.dtype() of a 12 MB dtype string took 15.9 s and +815 MB before the rejection;
    # now a dtype string is looked up in an allow-list (no parsing) and the reply's size, dtype
    # strings included, is bounded first
    from fedbgmd.wire import _parse_dtype

    assert _parse_dtype("float32") == np.float32 and _parse_dtype("uint8") == np.uint8
    assert _parse_dtype("<f4") is None and _parse_dtype(["float32"]) is None

    def odd_dtype(dtype: str):
        def make(p: int) -> RecordDict:
            content = _content(torch.zeros(D), p)
            arr = content["update"]["update"]
            content["update"]["update"] = Array(dtype, arr.shape, arr.stype, arr.data)
            return content

        return make

    s = make_strategy("mean")
    extra = {**_replace(1, odd_dtype("<f4")), **_replace(2, odd_dtype("f" * 1_000_000))}
    run_round(s, initial_arrays(), updates(), extra=extra)
    assert s.round_info[1]["rejections"] == {"wrong_dtype": 1, "too_large": 1}


# ------------------------------------------------------------------------ hole 6: counters
def _claimed_shape(shape: list[int]):
    def make(p: int) -> RecordDict:
        content = _content(torch.zeros(D), p)
        arr = content["update"]["update"]
        content["update"]["update"] = Array(arr.dtype, tuple(shape), arr.stype, arr.data)
        return content

    return make


@pytest.mark.parametrize("shape", [[2**40], [3, 2**62], [0]])
def test_bytes_up_counts_what_arrived_not_what_was_claimed(shape):
    # issue 13: (2^40,) counted 4.4e12 bytes, (3, 2^62) overflowed to -1.8e19
    honest = make_strategy("mean")
    run_round(honest, initial_arrays(), updates())
    s = make_strategy("mean")
    run_round(s, initial_arrays(), updates(), extra=_replace(2, _claimed_shape(shape)))
    arrived = len(_content(torch.zeros(D), 2)["update"]["update"].data)
    assert s.round_info[1]["replies_rejected"] == 1
    assert s.round_info[1]["bytes_up"] == honest.round_info[1]["bytes_up"] - 4 * D + arrived
    assert honest.round_info[1]["bytes_up"] == 5 * 4 * D  # the honest payload, as before


def test_a_duplicate_reply_does_not_hide_a_silent_node():
    # issue 13: timeouts = sent - len(replies), so a duplicate reply hid a silent client
    s, x0, ups = make_strategy("mean"), initial_arrays(), updates()
    msgs = send(s, x0)
    pid = s.node_to_partition
    replies = [
        reply_for(m, honest_content(ups[pid[m.metadata.dst_node_id]], pid[m.metadata.dst_node_id]))
        for m in msgs[:4]
    ]
    replies.append(reply_for(msgs[0], honest_content(ups[0], 0)))  # node of partition 0, again
    s.aggregate_train(1, replies)
    info = s.round_info[1]
    assert info["rejections"] == {"duplicate": 1, "timeout": 1}
    assert info["replies_accepted"] == 4


def test_client_reported_diagnostics_are_robust_and_bounded():
    # issue 13: two claims of 1.7e308 made train_loss and client_time_s inf
    def claim(p: int, **metrics: float):
        return {p: lambda r, m: reply_for(m, _content(updates()[p], p, **metrics))}

    s = make_strategy("mean")
    extra = {
        **claim(0, **{"train-loss": 1.7e308}),
        **claim(1, **{"client-time-s": 1.7e308}),
        **claim(2, **{"client-time-s": -1.0}),
    }
    run_round(s, initial_arrays(), updates(), extra=extra)
    info = s.round_info[1]
    assert info["rejections"] == {"bad_metrics": 2}  # client times outside [0, 1e6] s
    assert info["train_loss"] == 0.5  # the median of 1.7e308, 0.5, 0.5
    assert info["client_time_s"] == pytest.approx(3 * 0.01)  # n x the median claim
    # only two replies, both claiming 1.7e308: their median is 1.7e308, not (a + b) / 2 = inf
    s2 = make_strategy("mean")
    msgs = send(s2, initial_arrays())
    pid = s2.node_to_partition
    replies = [
        reply_for(
            m, _content(torch.zeros(D), pid[m.metadata.dst_node_id], **{"train-loss": 1.7e308})
        )
        for m in msgs[:2]
    ]
    s2.aggregate_train(1, replies)
    assert s2.round_info[1]["train_loss"] == 1.7e308


# ------------------------------------------------------------------------ fuzz
N_FUZZ = 7  # clients; at most 3 Byzantine, so the honest rows are a majority of every round
FUZZ_CONFIGS = {
    "gm": {},
    "cm": {"agg": "cm"},
    "weighted_gm_momentum": {"weighted": True, "server_momentum": 0.5},
    "fedbgmd": {"block": True, "beta": 0.25, "memory": "per_client"},
    "block_cm_mean_memory": {"agg": "cm", "block": True, "beta": 0.25, "memory": "mean"},
}
EXTREMES = (1e20, FLT_MAX, -FLT_MAX)


def _hostile(kind: str, pid: int, rng: np.random.Generator) -> RecordDict | None:
    """A hostile reply of partition pid (None: an error reply)."""
    if kind == "extreme":  # finite, accepted
        v = torch.tensor(rng.choice(EXTREMES, size=D), dtype=torch.float32)
        return _content(v, pid)
    if kind in ("nan", "inf"):
        v = torch.zeros(D)
        v[int(rng.integers(D))] = float(kind)
        return _content(v, pid)
    if kind == "wrong_shape":
        return _content(torch.zeros(D + int(rng.integers(1, 5))), pid)
    if kind == "claimed_shape":
        return _claimed_shape(
            [int(rng.integers(1, 2**62)) for _ in range(int(rng.integers(1, 3)))]
        )(pid)
    if kind == "dtype":
        content = _content(torch.zeros(D), pid)
        arr = content["update"]["update"]
        junk = "".join(rng.choice(list("<>|fiuc0123456789(),[]'x "), size=int(rng.integers(1, 64))))
        content["update"]["update"] = Array(junk, arr.shape, arr.stype, arr.data)
        return content
    if kind == "bad_metrics":
        key, value = [
            ("num-examples", 0.5),
            ("num-examples", 1e39),
            ("partition-id", (pid + 1) % N_FUZZ),
            ("client-time-s", -1.0),
            ("client-time-s", 1.7e308),
            ("train-loss", float("nan")),
        ][int(rng.integers(6))]
        return _content(torch.zeros(D), pid, **{key: value})
    if kind == "extra_record":
        return _with_record(
            pid, "junk", ConfigRecord({"s": "x" * int(rng.integers(5_000, 50_000))})
        )
    if kind == "bad_quant":
        arrays, q = encode_update(torch.zeros(D), method="qsgd", bits=8)
        base = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.0}
        return build_reply_content(arrays, q, base)
    if kind == "missing_record":
        return RecordDict({"metrics": MetricRecord({"x": 1})})
    assert kind == "error"
    return None


REJECTED_KINDS = (
    "nan", "inf", "wrong_shape", "claimed_shape", "dtype", "bad_metrics", "extra_record",
    "bad_quant", "missing_record", "error",
)  # fmt: skip


def _arrived(replies) -> tuple[int, int]:
    """Bytes of array data that arrived, and the number of arrays."""
    arrays = [
        a
        for r in replies
        if not r.has_error()
        for rec in r.content.values()
        if isinstance(rec, ArrayRecord)
        for a in rec.values()
    ]
    return sum(len(a.data) for a in arrays), len(arrays)


def _check_bound(name: str, u: torch.Tensor, honest: torch.Tensor, n_rows: int) -> None:
    """The aggregate stays within the rule's bound of the honest rows."""
    u, honest = u.double(), honest.double()
    if (
        name == "cm"
    ):  # coordinate-wise median: inside the honest rows' range, coordinate by coordinate
        assert bool(
            (u >= honest.min(0).values - 1e-6).all() and (u <= honest.max(0).values + 1e-6).all()
        )
        return
    # geometric median with honest share h > 1/2: ||GM - z|| <= 2h/(2h - 1) max_honest ||x_i - z||
    h = honest.shape[0] / n_rows
    z = honest.mean(0)
    radius = float((honest - z).norm(dim=1).max())
    assert float((u - z).norm()) <= 2 * h / (2 * h - 1) * radius * 1.001 + 1e-6


@pytest.mark.parametrize("config", sorted(FUZZ_CONFIGS))
def test_fuzz_hostile_replies(config):
    """Seeded episodes of honest, finite-extreme and malformed replies, duplicates and silent
    nodes. Invariants: nothing escapes aggregate_train; the rejected replies change nothing (the
    same round without them gives the same model, memory and momentum bitwise); the aggregate
    stays within the rule's bound of the honest rows; the counters equal what arrived."""
    params = dict(FUZZ_CONFIGS[config])
    agg = params.pop("agg", "gm")
    rng = np.random.default_rng(13)
    s = make_strategy(agg, n=N_FUZZ, **params)
    s.partition_sizes = [10] * N_FUZZ  # the server-known weights (weighted=true)
    s.expected_quantization = ("none", 8)  # as the server sets them
    x = initial_arrays()
    for rnd in range(1, 61):
        ups = torch.randn(N_FUZZ, D, generator=torch.Generator().manual_seed(rnd)) * 0.1
        byz = rng.choice(N_FUZZ, size=int(rng.integers(0, 4)), replace=False).tolist()
        kinds = {p: str(rng.choice(("extreme", *REJECTED_KINDS))) for p in byz}
        silent = {p for p in byz if rng.random() < 0.15}
        twice = {p for p in range(N_FUZZ) if p not in silent and rng.random() < 0.1}
        msgs = send(s, x, rnd)
        pid = s.node_to_partition
        everything, kept = [], []
        for m in msgs:
            p = pid[m.metadata.dst_node_id]
            if p in silent:
                continue
            if p in kinds:
                content = _hostile(kinds[p], p, rng)
                reply = reply_for(m, content, error=content is None)
            else:
                reply = reply_for(m, honest_content(ups[p], p))
            everything.append(reply)
            if kinds.get(p, "extreme") == "extreme":
                kept.append(reply)
            if p in twice:
                everything.append(
                    reply_for(
                        m, reply.content if not reply.has_error() else None, error=reply.has_error()
                    )
                )
        order = rng.permutation(len(everything))
        everything = [everything[i] for i in order]
        twin = copy.deepcopy(s)
        x_before = s.model.x.clone()
        s.aggregate_train(rnd, everything)  # must not raise
        twin.aggregate_train(rnd, kept)
        # rejected replies change nothing
        assert torch.equal(s.model.x, twin.model.x), (
            kinds,
            s.round_info[rnd].get("rejections"),
            twin.round_info[rnd].get("rejections"),
            s.round_info[rnd].get("skipped"),
        )
        assert (s.server_opt.buffer is None) == (twin.server_opt.buffer is None)
        if s.server_opt.buffer is not None:
            assert torch.equal(s.server_opt.buffer, twin.server_opt.buffer)
        if s.block_step is not None and s.block_step.memory is not None:
            assert twin.block_step is not None and twin.block_step.memory is not None
            a, b = s.block_step.memory.state_dict(), twin.block_step.memory.state_dict()
            assert all(
                torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                for k in a
            )
        # counters equal what arrived
        info = s.round_info[rnd]
        assert info["rejections"].get("timeout", 0) == len(silent)
        assert info["replies_accepted"] + info["replies_rejected"] == len(everything) + len(silent)
        assert info["replies_rejected"] == sum(info["rejections"].values())
        data, n_arrays = _arrived(everything)
        assert data - 128 * n_arrays <= info["bytes_up"] <= data
        assert math.isfinite(info.get("train_loss", 0.0)) and math.isfinite(info["client_time_s"])
        assert s.diverged is None
        # the aggregate stays within the rule's bound of the honest rows
        honest = [p for p in range(N_FUZZ) if p not in byz and p not in silent]
        accepted_extremes = [p for p in byz if kinds[p] == "extreme" and p not in silent]
        if not s.block and s.momentum == 0.0 and "skipped" not in info:
            n_rows = len(honest) + len(accepted_extremes)
            _check_bound(agg, x_before - s.model.x, ups[honest], n_rows)
        x = initial_arrays()  # the strategy keeps its own model; the record is a placeholder
