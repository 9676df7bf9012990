"""RobustStrategy fed with mock replies (no Ray, no ClientApp): math, ordering, defences."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbgmd.core import get_aggregator
from fedbgmd.engine import set_server_identity
from fedbgmd.strategies import RobustStrategy
from fedbgmd.wire import build_reply_content, encode_update

D = 12


@pytest.fixture(autouse=True)
def _server_identity():
    set_server_identity()


def initial_arrays(seed: int = 0) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    return ArrayRecord({"w": torch.randn(3, 4, generator=g)})


def make_strategy(agg: str = "mean", n: int = 5, **kw) -> RobustStrategy:
    s = RobustStrategy(
        aggregator=get_aggregator(agg, **kw.pop("agg_params", {})),
        num_clients=n,
        clients_per_round=kw.pop("clients_per_round", n),
        **kw,
    )
    s.set_node_map({100 + p: p for p in range(n)})
    return s


def reply_for(ins: Message, content: RecordDict | None = None, error: bool = False) -> Message:
    from flwr.app import Error

    reply = (
        Message(Error(code=1, reason="boom"), reply_to=ins)
        if error
        else Message(content, reply_to=ins)
    )
    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return reply


def send(strategy: RobustStrategy, arrays: ArrayRecord, rnd: int = 1) -> list[Message]:
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid=None))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msgs


def honest_content(update: torch.Tensor, pid: int, **quant) -> RecordDict:
    arrays, q = encode_update(update, **quant)
    metrics = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.01}
    return build_reply_content(arrays, q, metrics)


def updates(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def flat(arrays: ArrayRecord) -> torch.Tensor:
    return arrays.to_torch_state_dict()["w"].reshape(-1)


def run_round(strategy, arrays, ups, rnd=1, order=None, extra=None):
    msgs = send(strategy, arrays, rnd)
    pid_of = strategy.node_to_partition
    replies = [
        reply_for(
            m, honest_content(ups[pid_of[m.metadata.dst_node_id]], pid_of[m.metadata.dst_node_id])
        )
        for m in msgs
    ]
    if extra:
        replies = [
            extra.get(pid_of[m.metadata.dst_node_id], lambda r, m: r)(r, m)
            for r, m in zip(replies, msgs)
        ]
    if order is not None:
        replies = [replies[i] for i in order]
    return strategy.aggregate_train(rnd, replies)


def test_mean_step_matches_manual_computation():
    s, x0, ups = make_strategy("mean"), initial_arrays(), updates()
    new, metrics = run_round(s, x0, ups)
    torch.testing.assert_close(flat(new), flat(x0) - ups.mean(0), rtol=0, atol=1e-6)
    assert metrics["replies-accepted"] == 5


def test_reply_order_does_not_change_the_result():
    x0, ups = initial_arrays(), updates()
    a, _ = run_round(make_strategy("gm"), x0, ups, order=[0, 1, 2, 3, 4])
    b, _ = run_round(make_strategy("gm"), x0, ups, order=[4, 2, 0, 3, 1])
    assert torch.equal(flat(a), flat(b))


def test_block_step_with_full_block_and_no_memory_is_plain_gm():
    x0, ups = initial_arrays(), updates()
    plain, _ = run_round(make_strategy("gm"), x0, ups)
    block, _ = run_round(make_strategy("gm", block=True, beta=1.0, memory="none"), x0, ups)
    torch.testing.assert_close(flat(block), flat(plain), rtol=0, atol=1e-6)


def test_block_step_records_diagnostics_and_keeps_memory_per_partition():
    s = make_strategy("gm", block=True, beta=0.25, memory="per_client")
    run_round(s, initial_arrays(), updates())
    info = s.round_info[1]
    assert 0 < info["relative_residual"] < 1
    assert info["memory_norm"] > 0
    assert info["agg_iterations"] >= 1
    # the stored residual of every partition is its update with the applied block zeroed:
    # a zero column of the direction is outside the block (GM of random rows is nonzero)
    state = s.state_dict()["memory"]
    assert state["kind"] == "per_client" and state["client_ids"] == [0, 1, 2, 3, 4]
    x0, x1 = flat(initial_arrays()), flat(_model_of(s))
    outside = (x1 - x0) == 0
    assert int((~outside).sum()) == 3  # k = ⌈0.25 · 12⌉
    want = updates().clone()
    want[:, ~outside] = 0
    torch.testing.assert_close(state["rows"], want)
    assert info["memory_norm"] == pytest.approx(float(want.double().norm()), rel=1e-6)


def _model_of(s: RobustStrategy) -> ArrayRecord:
    assert s.model.x is not None
    return s.model.to_arrays()


@pytest.mark.parametrize("beta, dim, k", [(0.07, 100, 7), (0.29, 100, 29), (0.1, 12, 2)])
def test_block_size_is_the_decimal_ceiling(beta: float, dim: int, k: int) -> None:
    # ⌈0.07 · 100⌉ gave 8 (0.07 * 100 = 7.000000000000001); references are exact fractions
    from fractions import Fraction

    assert k == -(-Fraction(str(beta)) * dim // 1)
    s = make_strategy("mean", block=True, beta=beta, memory="none")
    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(0))
    direction, _ = s.aggregate_updates(x, [0, 1, 2, 3, 4], 1)
    assert int((direction != 0).sum()) == k


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda r, m: reply_for(m, error=True), "client_error"),
        (
            lambda r, m: reply_for(m, honest_content(torch.full((D,), float("nan")), 0)),
            "non_finite",
        ),
        (lambda r, m: reply_for(m, honest_content(torch.zeros(D + 1), 0)), "wrong_shape"),
        (
            lambda r, m: reply_for(m, RecordDict({"metrics": MetricRecord({"x": 1})})),
            "missing_record",
        ),
    ],
)
def test_bad_replies_are_rejected_with_their_reason_and_do_not_touch_the_model(corrupt, reason):
    x0, ups = initial_arrays(), updates()
    s = make_strategy("mean")
    new, _ = run_round(s, x0, ups, extra={0: corrupt})
    info = s.round_info[1]
    assert info["replies_rejected"] == 1 and info["rejections"] == {reason: 1}
    torch.testing.assert_close(flat(new), flat(x0) - ups[1:].mean(0), rtol=0, atol=1e-6)


def _content_with_arrays(arrays: dict[str, np.ndarray], pid: int) -> RecordDict:
    q = ConfigRecord({"method": "none", "bits": 8, "numel": D})
    metrics = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.0}
    return RecordDict(
        {
            "update": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "quant": q,
            "metrics": MetricRecord(metrics),
        }
    )


@pytest.mark.parametrize(
    "arrays, reason",
    [
        ({"update": np.zeros(D, dtype=np.float64)}, "wrong_dtype"),
        ({"update": np.zeros(D, np.float32), "x": np.zeros(2, np.float32)}, "unexpected_keys"),
        ({"other": np.zeros(D, np.float32)}, "unexpected_keys"),
        ({"update": np.zeros((D, 2), np.float32)}, "wrong_shape"),
        ({"update": np.zeros(D * 1000, np.float32)}, "too_large"),
    ],
)
def test_malformed_arrays_are_rejected(arrays, reason):
    s = make_strategy("mean")
    x0, ups = initial_arrays(), updates()
    new, _ = run_round(
        s, x0, ups, extra={2: lambda r, m: reply_for(m, _content_with_arrays(arrays, 2))}
    )
    assert s.round_info[1]["rejections"] == {reason: 1}
    torch.testing.assert_close(flat(new), flat(x0) - ups[[0, 1, 3, 4]].mean(0), atol=1e-6, rtol=0)


def _with_metrics(pid: int, **changes) -> RecordDict:
    arrays, q = encode_update(torch.zeros(D))
    metrics = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.0}
    return build_reply_content(arrays, q, {**metrics, **changes})


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: _with_metrics(2, **{"num-examples": 0.5}), "bad_metrics"),
        (lambda: _with_metrics(2, **{"num-examples": 1e39}), "bad_metrics"),
        (lambda: _with_metrics(2, **{"partition-id": 2.01}), "bad_metrics"),
    ],
)
def test_hostile_metrics_are_rejected(make, reason):
    # a fractional partition id was truncated onto a partition; 1e39 examples overflowed float32
    s = make_strategy("mean")
    run_round(s, initial_arrays(), updates(), extra={2: lambda r, m: reply_for(m, make())})
    assert s.round_info[1]["rejections"] == {reason: 1}


@pytest.mark.parametrize("dtype", ["bogus", "(-1,)f4"])
def test_a_malformed_dtype_string_is_rejected_not_fatal(dtype):
    content = _content_with_arrays({"update": np.zeros(D, np.float32)}, 2)
    arr = content["update"]["update"]
    content["update"]["update"] = Array(dtype, arr.shape, arr.stype, arr.data)
    s = make_strategy("mean")
    x0, ups = initial_arrays(), updates()
    new, _ = run_round(s, x0, ups, extra={2: lambda r, m: reply_for(m, content)})
    assert s.round_info[1]["rejections"] == {"wrong_dtype": 1}
    torch.testing.assert_close(flat(new), flat(x0) - ups[[0, 1, 3, 4]].mean(0), atol=1e-6, rtol=0)


def test_weights_are_the_server_known_partition_sizes_not_the_claims():
    # a hostile reply claiming 1e9 examples owned a weighted aggregate (the step was its update)
    x0, ups = initial_arrays(), updates()
    sizes = [10, 20, 30, 40, 50]

    s = make_strategy("mean", weighted=True)
    s.partition_sizes = sizes
    pid_of = s.node_to_partition
    msgs = send(s, x0)
    replies = []
    for m in msgs:
        pid = pid_of[m.metadata.dst_node_id]
        arrays, q = encode_update(ups[pid])
        n = 10**9 if pid == 3 else sizes[pid]
        metrics = {"num-examples": n, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.0}
        replies.append(reply_for(m, build_reply_content(arrays, q, metrics)))
    new, _ = s.aggregate_train(1, replies)
    w = torch.tensor(sizes, dtype=torch.float32)
    want = (w[:, None] * ups).sum(0) / w.sum()
    torch.testing.assert_close(flat(new), flat(x0) - want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "expected, sent, ok",
    [
        (("none", 8), dict(), True),
        (("none", 8), dict(method="qsgd", bits=8), False),
        (("qsgd", 8), dict(method="qsgd", bits=4), False),
        (("qsgd", 8), dict(method="qsgd", bits=8), True),
        (("sign", 1), dict(method="sign", bits=1), True),
        (("sign", 1), dict(method="qsgd", bits=1), False),
    ],
)
def test_replies_must_use_the_run_quantizer(expected, sent, ok):
    # any quantizer setting used to be accepted, e.g. sign with 8 bits, which no client can send
    s = make_strategy("mean")
    s.expected_quantization = expected
    x0, ups = initial_arrays(), updates()
    method, bits = expected
    msgs = send(s, x0)
    replies = []
    for m in msgs:
        pid = s.node_to_partition[m.metadata.dst_node_id]
        quant = sent if pid == 2 else ({} if method == "none" else dict(method=method, bits=bits))
        arrays, q = encode_update(ups[pid], **quant)
        metrics = {"num-examples": 10, "train-loss": 0.5, "partition-id": pid, "client-time-s": 0.0}
        replies.append(reply_for(m, build_reply_content(arrays, q, metrics)))
    s.aggregate_train(1, replies)
    assert s.round_info[1]["rejections"] == ({} if ok else {"bad_quantization": 1})


def test_a_reply_claiming_another_partition_is_rejected():
    s = make_strategy("mean")
    run_round(
        s,
        initial_arrays(),
        updates(),
        extra={1: lambda r, m: reply_for(m, honest_content(torch.zeros(D), 3))},
    )
    assert s.round_info[1]["rejections"] == {"wrong_partition": 1}


def test_round_is_skipped_below_min_replies():
    s = make_strategy("mean", min_replies=5)
    new, metrics = run_round(
        s, initial_arrays(), updates(), extra={0: lambda r, m: reply_for(m, error=True)}
    )
    # nothing applied; the Result still gets the round's diagnostics
    assert new is None and metrics is not None
    assert metrics["replies-accepted"] == 4 and metrics["rejected-client-error"] == 1
    assert "min_replies" in s.round_info[1]["skipped"]


def test_quantized_replies_are_dequantized_and_count_fewer_bytes():
    x0, ups = initial_arrays(), updates()
    s = make_strategy("mean")
    msgs = send(s, x0)
    pid = s.node_to_partition
    replies = [
        reply_for(
            m,
            honest_content(
                ups[pid[m.metadata.dst_node_id]],
                pid[m.metadata.dst_node_id],
                method="qsgd",
                bits=16,
            ),
        )
        for m in msgs
    ]
    new, _ = s.aggregate_train(1, replies)
    torch.testing.assert_close(flat(new), flat(x0) - ups.mean(0), atol=1e-3, rtol=0)
    assert s.round_info[1]["bytes_up"] < 5 * D * 4


def test_sampling_is_seeded_and_sized():
    a = make_strategy("mean", n=20, clients_per_round=7, seed=3)
    b = make_strategy("mean", n=20, clients_per_round=7, seed=3)
    draws = [a.sample_partitions(r) for r in range(1, 6)]
    assert draws == [b.sample_partitions(r) for r in range(1, 6)]
    assert all(len(d) == 7 == len(set(d)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # changes across rounds


def test_omniscient_adversary_rewrites_only_byzantine_rows():
    class Constant:
        def __call__(self, honest, num_byzantine, *, generator, aggregator=None):
            return torch.full((num_byzantine, honest.shape[1]), 7.0)

    s = make_strategy("mean", adversary=Constant(), byzantine_ids=[1, 3])
    x0, ups = initial_arrays(), updates()
    new, _ = run_round(s, x0, ups)
    expected = ups.clone()
    expected[[1, 3]] = 7.0
    torch.testing.assert_close(flat(new), flat(x0) - expected.mean(0), atol=1e-6, rtol=0)


class _Rows:
    """An omniscient adversary returning fixed rows (one per Byzantine client)."""

    def __init__(self, *rows: float) -> None:
        self.rows = rows

    def __call__(self, honest, num_byzantine, *, generator, aggregator=None):
        assert num_byzantine == len(self.rows)
        return torch.stack([torch.full((honest.shape[1],), v) for v in self.rows])


def test_omniscient_rows_meet_the_reply_checks():
    """A non-finite row and a row above max_update_norm are rejected with their reasons, as a
    reply would be; the model steps by the mean of the rows left (written here by hand)."""
    s = make_strategy("mean", adversary=_Rows(float("nan"), 100.0, 0.5), byzantine_ids=[1, 2, 3])
    s.max_update_norm = 50.0  # honest rows: norm ~ sqrt(12); 100·sqrt(12) > 50 > 0.5·sqrt(12)
    x0, ups = initial_arrays(), updates()
    new, metrics = run_round(s, x0, ups)
    kept = torch.stack([ups[0], torch.full((D,), 0.5), ups[4]])
    torch.testing.assert_close(flat(new), flat(x0) - kept.mean(0), atol=1e-6, rtol=0)
    info = s.round_info[1]
    assert info["rejections"] == {"non_finite": 1, "norm_too_large": 1}
    assert info["replies_accepted"] == metrics["replies-accepted"] == 3
    assert info["replies_rejected"] == 2


def test_rejected_omniscient_rows_count_towards_min_replies():
    s = make_strategy("mean", adversary=_Rows(float("inf"), 1.0), byzantine_ids=[1, 3])
    s.min_replies = 5
    new, metrics = run_round(s, initial_arrays(), updates())
    assert new is None and metrics is not None
    assert metrics["replies-accepted"] == 4 and metrics["rejected-non-finite"] == 1
    assert "min_replies" in s.round_info[1]["skipped"]
    assert s.round_info[1]["rejections"] == {"non_finite": 1}


def test_row_rejections_follow_the_reply_order_of_checks():
    from fedbgmd.strategies.robust import row_rejections

    rows = torch.tensor([[1.0, 0.0], [float("nan"), 1e9], [3.0, 4.0], [float("inf"), 0.0]])
    assert row_rejections(rows, None) == [None, "non_finite", None, "non_finite"]
    assert row_rejections(rows, 4.9) == [None, "non_finite", "norm_too_large", "non_finite"]
    assert row_rejections(rows, 5.0) == [None, "non_finite", None, "non_finite"]


def test_omniscient_attacks_work_in_full_dimension_in_block_mode():
    """Documented (fedbgmd.attacks.base, README): in block mode the adversary sees the honest
    rows and the aggregator in full dimension d, not the k coordinates of the block."""
    seen = []

    class Probe:
        def __call__(self, honest, num_byzantine, *, generator, aggregator=None):
            seen.append((tuple(honest.shape), tuple(aggregator(honest).shape)))
            return -honest[:num_byzantine]

    s = make_strategy("gm", adversary=Probe(), byzantine_ids=[0], block=True, beta=0.25)
    run_round(s, initial_arrays(), updates())
    assert seen == [((4, D), (D,))]


def test_server_momentum_accumulates():
    s = make_strategy("mean", server_momentum=0.5)
    x0 = initial_arrays()
    ups = updates()
    x1, _ = run_round(s, x0, ups, rnd=1)
    x2, _ = run_round(s, x1, ups, rnd=2)
    g = ups.mean(0)
    torch.testing.assert_close(flat(x2), flat(x0) - g - (0.5 * g + g), atol=1e-5, rtol=0)


def test_clients_that_do_not_reply_are_counted_as_timeouts_and_the_round_goes_on():
    s, x0, ups = make_strategy("mean"), initial_arrays(), updates()
    msgs = send(s, x0)
    pid = s.node_to_partition
    replies = [
        reply_for(m, honest_content(ups[pid[m.metadata.dst_node_id]], pid[m.metadata.dst_node_id]))
        for m in msgs[:3]
    ]  # two sampled clients never answer
    new, _ = s.aggregate_train(1, replies)
    assert s.round_info[1]["rejections"] == {"timeout": 2}
    assert s.round_info[1]["replies_accepted"] == 3
    torch.testing.assert_close(flat(new), flat(x0) - ups[:3].mean(0), atol=1e-6, rtol=0)


def test_model_by_reference_sends_a_placeholder_and_keeps_the_model():
    """In-process device-resident mode: clients get a reference, the result stays exact."""
    from fedbgmd.wire import DEVICE_STORE, MODEL_REF_KEY

    ref, plain = make_strategy(), make_strategy()
    ref.model_by_reference = True
    arrays, ups = initial_arrays(), updates()
    msgs = send(ref, arrays)
    content = msgs[0].content
    assert len(content["arrays"]) == 0 and all(m.content is content for m in msgs)
    x = DEVICE_STORE.shared(content["config"][MODEL_REF_KEY])
    assert torch.equal(x, flat(arrays))
    assert ref.round_info[1]["bytes_down"] == 5 * 4 * D  # the model's payload per client
    new_ref, _ = run_round(ref, arrays, ups, rnd=1)
    new_plain, _ = run_round(plain, arrays, ups, rnd=1)
    assert new_ref is not None and len(new_ref) == 0  # placeholder
    assert torch.equal(ref.global_state()["w"].reshape(-1), flat(new_plain))
    with pytest.raises(LookupError, match="unknown model reference"):  # dropped after the round
        DEVICE_STORE.shared(content["config"][MODEL_REF_KEY])


def test_a_reference_reply_the_server_never_issued_is_rejected():
    strategy = make_strategy()
    arrays = initial_arrays()
    msgs = send(strategy, arrays)
    pid_of = strategy.node_to_partition
    forged = ConfigRecord({"method": "device", "bits": 32, "numel": D, "ref": "f" * 32})
    metrics = {"num-examples": 10, "train-loss": 0.5, "client-time-s": 0.01}
    replies = [
        reply_for(
            m,
            RecordDict(
                {
                    "update": ArrayRecord({}),
                    "quant": forged,
                    "metrics": MetricRecord(
                        {**metrics, "partition-id": pid_of[m.metadata.dst_node_id]}
                    ),
                }
            ),
        )
        for m in msgs
    ]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is None
    assert strategy.round_info[1]["rejections"] == {"missing_key": 5}


def test_node_discovery_skips_hostile_or_broken_replies(caplog):
    """A query reply without a valid integer partition id is skipped with a warning; a partition
    claimed twice is served by neither claimant (the first to answer used to keep it, so an
    impostor answering first displaced the honest node without a trace)."""
    from fedbgmd.server import discover_nodes

    answers = {
        1: {"partition-id": 0},
        2: {"partition-id": [1, 2]},  # a list is a valid MetricRecord value, not a partition id
        3: {"num-examples": 5},  # no partition id at all
        4: {"partition-id": 1.5},
        5: {"partition-id": 0},  # claims a partition already served
        6: {"partition-id": 99},  # out of range
        7: {"partition-id": 1},
    }

    class FakeGrid:
        def get_node_ids(self):
            return list(answers)

        def send_and_receive(self, msgs, timeout=None):
            out = []
            for m in msgs:
                node = m.metadata.dst_node_id
                reply = Message(RecordDict({"node": MetricRecord(answers[node])}), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = node
                out.append(reply)
            return out

    assert discover_nodes(FakeGrid(), num_clients=2, timeout=1.0) == {7: 1}
    assert "partition 0 claimed by nodes [1, 5]" in caplog.text


def test_checks_keep_their_order_when_finiteness_is_checked_for_all_replies_at_once():
    """A NaN reply that also claims another partition is counted as non_finite (the check that
    comes first), a finite reply whose float32 sum overflows is accepted, +inf is rejected."""
    n = 6
    s = make_strategy("mean", n=n)
    ups = updates(n)
    big = torch.full((D,), 3e38)  # finite entries, the float32 sum overflows
    extra = {
        0: lambda r, m: reply_for(m, honest_content(torch.full((D,), float("nan")), 3)),
        1: lambda r, m: reply_for(m, honest_content(big, 1)),
        2: lambda r, m: reply_for(m, honest_content(torch.full((D,), float("inf")), 2)),
        4: lambda r, m: reply_for(m, honest_content(ups[4], 5)),
    }
    run_round(s, initial_arrays(), ups, extra=extra)
    assert s.round_info[1]["rejections"] == {"non_finite": 2, "wrong_partition": 1}
    assert s.round_info[1]["replies_accepted"] == 3  # partitions 1 (big), 3, 5


def test_reply_validation_reads_the_host_a_fixed_number_of_times_whatever_the_replies():
    """On a GPU every bool()/float()/tolist() of a device tensor waits for the device: the
    server's reply validation must not do one per reply."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.n += 1
            return func(*args, **(kwargs or {}))

    def reads(n: int, monkeypatch: pytest.MonkeyPatch) -> int:
        s = make_strategy("mean", n=n)
        msgs = send(s, initial_arrays(), 1)
        pid_of = s.node_to_partition
        ups = updates(n)
        replies = [
            reply_for(
                m,
                honest_content(ups[pid_of[m.metadata.dst_node_id]], pid_of[m.metadata.dst_node_id]),
            )
            for m in msgs
        ]
        counter = HostReads()
        tolist = torch.Tensor.tolist
        calls = []
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or tolist(t))
            with counter:
                verdict = s.validator.validate(replies, s.model, s.node_to_partition.get)
        assert len(verdict.accepted) == n and not verdict.reasons
        return counter.n + len(calls)

    with pytest.MonkeyPatch.context() as mp:
        few, many = reads(4, mp), reads(16, mp)
    assert few == many <= 1


@pytest.mark.parametrize("agg", ["mean", "gm"])
def test_weighted_block_step_equals_the_weighted_plain_step(agg):
    # the block step used to drop the client weights (an unweighted aggregate of the block)
    x0, ups = initial_arrays(), updates()

    def content(pid: int) -> RecordDict:
        arrays, q = encode_update(ups[pid])
        metrics = {
            "num-examples": 1 + 10 * pid,
            "train-loss": 0.5,
            "partition-id": pid,
            "client-time-s": 0.01,
        }
        return build_reply_content(arrays, q, metrics)

    got = []
    for kw in ({}, {"block": True, "beta": 1.0, "memory": "none"}):
        s = make_strategy(agg, weighted=True, **kw)
        pid = s.node_to_partition
        msgs = send(s, x0)
        new, _ = s.aggregate_train(
            1, [reply_for(m, content(pid[m.metadata.dst_node_id])) for m in msgs]
        )
        got.append(flat(new))
    w = torch.tensor([1.0 + 10 * p for p in range(5)])
    want = get_aggregator(agg)(ups, w).vector
    torch.testing.assert_close(got[0], flat(x0) - want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=1e-6)
    unweighted = get_aggregator(agg)(ups).vector
    assert float((want - unweighted).norm()) > 1e-2  # the weights matter in this test


def test_cclip_history_is_saved_and_restored_with_the_strategy_checkpoint() -> None:
    params = {"tau": 0.5, "iterations": 2, "center": "previous"}
    x0 = initial_arrays()
    a = make_strategy("cclip", agg_params=params)
    run_round(a, x0, updates(seed=1), rnd=1)
    state = a.state_dict()
    assert state["aggregator"]["previous"] is not None
    new2, _ = run_round(a, _model_of(a), updates(seed=2), rnd=2)
    # a fresh strategy resumed from the round-1 checkpoint takes the same second step
    b = make_strategy("cclip", agg_params=params)
    b.load_state_dict(state)
    resumed, _ = run_round(b, _arrays(state["x"]), updates(seed=2), rnd=2)
    torch.testing.assert_close(flat(resumed), flat(new2))
    # without the aggregator's state the centre restarts at zero: a different step
    c = make_strategy("cclip", agg_params=params)
    c.load_state_dict({k: v for k, v in state.items() if k != "aggregator"})
    other, _ = run_round(c, _arrays(state["x"]), updates(seed=2), rnd=2)
    assert not torch.allclose(flat(other), flat(new2))


def _arrays(x: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"w": x.reshape(3, 4).clone()})


def test_a_stateful_aggregator_is_refused_in_the_block_step() -> None:
    with pytest.raises(ValueError, match="keeps state"):
        make_strategy("cclip", agg_params={"center": "previous"}, block=True)


def test_omniscient_trial_aggregations_do_not_advance_a_stateful_aggregator() -> None:
    class Prober:
        def __call__(self, honest, n_byz, generator=None, aggregator=None):
            for _ in range(5):
                aggregator(honest * 3.0)
            return honest[:n_byz] * -1.0

    s = make_strategy(
        "cclip",
        agg_params={"tau": 0.5, "center": "previous"},
        adversary=Prober(),
        byzantine_ids=[0],
    )
    ups = updates()
    s.omniscient.apply(ups, [0, 1, 2, 3, 4], 1)
    assert s.aggregator.state_dict() == {"previous": None}
