"""RobustStrategy in a standard Flower app, fed mock replies: node identity, standard replies
(trained weights) next to compact ones, precise rejections, Flower's sampling (issue 15)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbgmd.engine import set_server_identity
from fedbgmd.strategies import FedBGMD, RobustStrategy
from fedbgmd.wire import build_reply_content, encode_update

NODES = [11, 22, 33, 44, 55]


@pytest.fixture(autouse=True)
def _server_identity():
    set_server_identity()


class Nodes:
    """The part of a Grid that sampling reads."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(2, generator=g),
        "steps": torch.tensor(7),  # a non-float entry: must be there, is not aggregated
    }


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["w"].reshape(-1), state["b"]])


def reply(ins: Message, content: RecordDict) -> Message:
    out = Message(content, reply_to=ins)
    out.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return out


def send(s: RobustStrategy, state: dict, rnd: int = 1, nodes=NODES) -> list[Message]:
    msgs = list(s.configure_train(rnd, ArrayRecord(state), ConfigRecord({"lr": 0.1}), Nodes(nodes)))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msgs


def trained(state: dict, update: torch.Tensor, **metrics) -> RecordDict:
    """A standard Flower reply: the weights y = x − update."""
    y = {
        "w": state["w"] - update[:12].reshape(3, 4),
        "b": state["b"] - update[12:],
        "steps": state["steps"],
    }
    values = {"num-examples": 10, "train_loss": 0.3, **metrics}
    return RecordDict({"arrays": ArrayRecord(y), "metrics": MetricRecord(values)})


def ups(seed: int = 1) -> torch.Tensor:
    return torch.randn(len(NODES), 14, generator=torch.Generator().manual_seed(seed))


def test_standard_and_compact_replies_give_the_same_step() -> None:
    state, u = model(), ups()
    got = []
    for compact in (False, True):
        s = RobustStrategy(aggregator="mean")
        msgs = send(s, state)
        assert [m.metadata.dst_node_id for m in msgs] == NODES  # fraction_train=1: every node
        replies = []
        for i, m in enumerate(msgs):
            if compact:
                arrays, q = encode_update(u[i])
                content = build_reply_content(arrays, q, {"num-examples": 10})
            else:
                content = trained(state, u[i])
            replies.append(reply(m, content))
        new, metrics = s.aggregate_train(1, replies)
        assert new is not None and metrics["replies-accepted"] == 5
        got.append(flat(new.to_torch_state_dict()))
        assert new.to_torch_state_dict()["steps"] == 7
    want = flat(state) - u.mean(0)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], want, rtol=0, atol=1e-6)


def test_the_train_config_reaches_the_clients_unchanged() -> None:
    s = FedBGMD()
    msgs = send(s, model(), rnd=3)
    assert dict(msgs[0].content["config"]) == {"lr": 0.1, "server-round": 3}
    with_schedule = RobustStrategy(client_lr=lambda r: 0.5)
    with pytest.raises(ValueError, match="'lr'"):  # two sources of the lr: refused, not replaced
        send(with_schedule, model())


def test_nodes_are_sampled_as_fedavg_samples_them_with_a_seeded_draw() -> None:
    s = RobustStrategy(fraction_train=0.5, min_train_nodes=2, seed=4)
    draws = [[m.metadata.dst_node_id for m in send(s, model(), rnd)] for rnd in range(1, 6)]
    assert all(len(d) == 2 and set(d) <= set(NODES) for d in draws)  # int(5 x 0.5) = 2
    again = RobustStrategy(fraction_train=0.5, min_train_nodes=2, seed=4)
    assert draws == [[m.metadata.dst_node_id for m in send(again, model(), r)] for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1


def test_memory_is_kept_per_replying_node() -> None:
    state = model()
    s = FedBGMD(beta=0.5)
    msgs = send(s, state)
    s.aggregate_train(1, [reply(m, trained(state, u)) for m, u in zip(msgs, ups())])
    assert s.block_step is not None and s.block_step.memory is not None
    assert sorted(s.block_step.memory.client_ids) == NODES


def _bad(state: dict, kind: str) -> RecordDict:
    content = trained(state, torch.zeros(14))
    arrays = content["arrays"]
    if kind == "missing_key":
        del arrays["b"]
    elif kind == "unexpected_keys":
        arrays["extra"] = Array(np.zeros(2, np.float32))
    elif kind == "wrong_dtype":
        arrays["b"] = Array(np.zeros(2, np.float64))
    elif kind == "wrong_shape":
        arrays["w"] = Array(np.zeros((4, 3), np.float32))
    elif kind == "bad_metrics":
        content["metrics"] = MetricRecord({"train_loss": 0.3})  # no num-examples
    elif kind == "missing_record":
        content = RecordDict({"metrics": content["metrics"]})
    elif kind == "non_finite":
        arrays["w"] = Array(np.full((3, 4), np.nan, np.float32))
    elif kind == "too_large":
        arrays["w"] = Array(np.zeros(100_000, np.float32))
    return content


@pytest.mark.parametrize(
    "kind, detail",
    [
        ("missing_key", "'b'"),
        ("unexpected_keys", "extra"),
        ("wrong_dtype", "float64"),
        ("wrong_shape", "[4, 3]"),
        ("bad_metrics", "'num-examples' missing"),
        ("missing_record", "'metrics' (MetricRecord)"),
        ("non_finite", "NaN"),
        ("too_large", "bytes"),
    ],
)
def test_a_bad_standard_reply_is_rejected_with_a_reason_that_names_the_problem(
    kind: str, detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    state, u = model(), ups()
    s = RobustStrategy(aggregator="mean")
    msgs = send(s, state)
    replies = [reply(m, trained(state, u[i])) for i, m in enumerate(msgs)]
    replies[2] = reply(msgs[2], _bad(state, kind))
    with caplog.at_level("DEBUG", logger="fedbgmd"):
        new, metrics = s.aggregate_train(1, replies)
    assert s.round_info[1]["rejections"] == {kind: 1}
    assert metrics[f"rejected-{kind.replace('_', '-')}"] == 1
    assert any(
        detail in r.getMessage() for r in caplog.records if "rejected reply" in r.getMessage()
    )
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(flat(new.to_torch_state_dict()), flat(state) - u[keep].mean(0))


def test_a_node_not_asked_and_a_second_reply_are_rejected() -> None:
    state, u = model(), ups()
    s = RobustStrategy(aggregator="mean", fraction_train=0.4, min_train_nodes=2)
    msgs = send(s, state)
    asked = {m.metadata.dst_node_id for m in msgs}
    stranger = next(n for n in NODES if n not in asked)
    intruder = reply(msgs[0], trained(state, u[0]))
    intruder.metadata.__dict__["_src_node_id"] = stranger
    replies = [reply(m, trained(state, u[i])) for i, m in enumerate(msgs)]
    s.aggregate_train(1, [*replies, reply(msgs[1], trained(state, u[1])), intruder])
    assert s.round_info[1]["rejections"] == {"unknown_node": 1, "duplicate": 1}


def test_bad_evaluate_replies_are_dropped_not_fatal() -> None:
    s = FedBGMD()
    msgs = send(s, model())
    good = [
        reply(m, RecordDict({"metrics": MetricRecord({"acc": 0.5, "num-examples": 10})}))
        for m in msgs[:3]
    ]
    bad = [
        reply(msgs[3], RecordDict({"metrics": MetricRecord({"acc": 0.5})})),  # no num-examples
        reply(
            msgs[4], RecordDict({"a": MetricRecord({"acc": 1.0}), "b": MetricRecord({"x": 1.0})})
        ),
    ]
    agg = s.aggregate_evaluate(1, [*good, *bad])
    assert agg is not None and agg["acc"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"selector": "bogus"}, "unknown selector 'bogus'"),
        ({"memory": "bogus"}, "unknown memory 'bogus'"),
        ({"beta": 0.0}, r"must be in \(0, 1\]"),
        ({"beta": 2.0}, r"must be in \(0, 1\]"),
    ],
)
def test_a_bad_block_setting_is_refused_when_the_strategy_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobustStrategy(aggregator="cm", block=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"bits": 0}, {"bits": 17}, {"method": "sign", "bits": 8}, {"bucket_size": 0}]
)
def test_the_client_mod_refuses_bad_quantizer_settings_when_built(kwargs):
    from fedbgmd.clients.mod import compact_update_mod

    with pytest.raises(ValueError):
        compact_update_mod(**kwargs)
    compact_update_mod(method="sign")  # sign's one bit by default
