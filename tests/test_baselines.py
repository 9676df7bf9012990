"""Baseline presets and the assumptions they make about the attack (issue 18)."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_module

from fedbgmd.checks import assumption_warnings, check_components
from fedbgmd.config import register_configs
from fedbgmd.plugins import build_aggregator


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["strategy=krum", "attack=bit_flip", "attack.fraction=0.2"], "f=1"),
        (["strategy=bulyan", "num_clients=20", "attack=bit_flip", "attack.fraction=0.05"], None),
        (["strategy=krum", "attack=none"], "f=1"),
        (["strategy=norm_filter", "attack=bit_flip", "attack.fraction=0.3"], "trim=0.2"),
        (["strategy=norm_filter", "attack=bit_flip", "attack.fraction=0.2"], None),
        (["strategy=ctm", "attack=bit_flip", "attack.fraction=0.2"], "trim=0.1"),
        (["strategy=gm", "attack=bit_flip", "attack.fraction=0.2"], None),
    ],
)
def test_an_assumed_byzantine_count_apart_from_the_attack_is_warned(
    overrides, warned, caplog
) -> None:
    cfg = compose_cfg(*overrides)
    got = assumption_warnings(cfg)
    assert (got == []) if warned is None else (len(got) == 1 and warned in got[0])
    with caplog.at_level(logging.WARNING, logger="fedbgmd"):
        check_components(cfg)
    assert any("assumes f" in r.message or "trims fewer" in r.message for r in caplog.records) == (
        warned is not None
    )


def test_presets_build_the_rules_as_documented() -> None:
    nc = build_aggregator(compose_cfg("strategy=nc").strategy.aggregator)
    assert nc.tau is None  # relative radius: the median update norm
    cc = build_aggregator(compose_cfg("strategy=cclip").strategy.aggregator)
    assert cc.center == "previous" and cc.stateful and cc.tau < 1.0
    nf = build_aggregator(compose_cfg("strategy=norm_filter").strategy.aggregator)
    assert nf.name == "norm_filter" and nf.trim == 0.2


# ----------------------------------------------------------------------------- bucketed QSGD wire
def _reply(update, **quant):
    from fedbgmd.wire import build_reply_content, encode_update

    arrays, q = encode_update(update, **quant)
    metrics = {"num-examples": 10, "train-loss": 0.5, "partition-id": 0, "client-time-s": 0.01}
    return build_reply_content(arrays, q, metrics), arrays


def test_bucketed_qsgd_travels_with_one_norm_per_bucket() -> None:
    import torch

    from fedbgmd.core import dequantize, quantize
    from fedbgmd.wire import decode_update, reply_nbytes

    d, b = 1000, 128
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    content, arrays = _reply(
        v, method="qsgd", bits=4, bucket_size=b, generator=torch.Generator().manual_seed(1)
    )
    assert arrays["scale"].shape == (-(-d // b),)
    got, _ = decode_update(content, d, 10 * d, ("qsgd", 4, b))
    want = dequantize(quantize(v, 4, "qsgd", torch.Generator().manual_seed(1), bucket_size=b))
    assert torch.equal(got, want)
    # bytes up count the packed codes and every bucket's float32 norm
    plain, _ = _reply(v, method="qsgd", bits=4, generator=torch.Generator().manual_seed(1))
    assert reply_nbytes(content) - reply_nbytes(plain) == 4 * (-(-d // b) - 1)


@pytest.mark.parametrize("sent, expected", [(128, 512), (None, 512), (512, None)])
def test_a_bucket_size_other_than_the_runs_is_rejected(sent, expected) -> None:
    import torch

    from fedbgmd.wire import BadReply, decode_update

    v = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    content, _ = _reply(v, method="qsgd", bits=4, bucket_size=sent)
    with pytest.raises(BadReply, match="bucket_size"):
        decode_update(content, 1000, 10_000, ("qsgd", 4, expected))
