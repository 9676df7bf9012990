"""Baseline presets and the assumptions they make about the attack (issue 18)."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_module

from fedbgmd.components import assumption_warnings, build_aggregator, check_components
from fedbgmd.config import register_configs


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
        (["strategy=norm_filter", "attack=bit_flip", "attack.fraction=0.3"], "beta=0.2"),
        (["strategy=norm_filter", "attack=bit_flip", "attack.fraction=0.2"], None),
        (["strategy=ctm", "attack=bit_flip", "attack.fraction=0.2"], "beta=0.1"),
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
    assert nf.name == "norm_filter" and nf.beta == 0.2
