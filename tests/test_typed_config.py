"""Typed config end to end (issue 20, item 2): a checked config becomes the dataclass schemas
once, and each part of a run gets its own sub-config; the choice lists come from where each
choice is defined."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from omegaconf import MISSING as OMEGACONF_MISSING
from omegaconf import OmegaConf

from fedbgmd import config
from fedbgmd.clients.honest import ClientRuntime
from fedbgmd.config import (
    AttackConfig,
    ClientConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    choices,
    compose_config,
    plain,
    to_typed,
    validate,
)
from fedbgmd.workload import load_data, model_kwargs, optim_config, partitions

PRESETS = [
    ["experiment=smoke"],
    ["experiment=smoke", "strategy=norm_filter", "attack=nonfinite", "attack.fraction=0.2"],
    ["experiment=smoke", "strategy=krum", "attack=alie_omniscient", "num_clients=8"],
    ["experiment=quickstart", "client.quantization.method=qsgd", "data.image_shape=[1,8,8]"],
]


@pytest.mark.parametrize("overrides", PRESETS, ids=lambda o: " ".join(o[1:]) or o[0])
def test_a_composed_config_becomes_the_typed_schema_with_the_same_values(overrides):
    composed = compose_config(overrides)
    typed = to_typed(composed)
    assert type(typed) is Config and to_typed(typed) is typed
    for field, schema in [
        ("data", DataConfig),
        ("model", ModelConfig),
        ("client", ClientConfig),
        ("attack", AttackConfig),
    ]:
        assert type(getattr(typed, field)) is schema
    # OmegaConf's own conversion is the reference: summary.json's config is unchanged
    assert plain(typed) == OmegaConf.to_container(composed, resolve=True)
    assert plain(composed) == plain(typed)


def test_the_schemas_missing_marker_is_omegaconfs():
    assert config.MISSING == OMEGACONF_MISSING


def test_to_typed_refuses_a_config_of_another_shape():
    with pytest.raises(TypeError, match="Config schema"):
        to_typed(OmegaConf.create({"num_rounds": 3}))


def test_the_client_runtime_takes_its_sub_configs_not_the_whole_config():
    params = set(inspect.signature(ClientRuntime).parameters)
    assert params == {
        "data", "model", "client", "attack", "seed", "num_clients", "device", "batch_chunk"
    }  # fmt: skip
    typed = to_typed(compose_config(["experiment=smoke"]))
    runtime = ClientRuntime.from_config(typed)
    assert runtime.data_cfg is typed.data and runtime.attack_cfg is typed.attack
    assert not hasattr(runtime, "cfg")


def test_the_workload_is_built_from_sub_configs():
    typed = to_typed(compose_config(["experiment=smoke", "model=mlp", "model.hidden=[7]"]))
    data = load_data(typed.data, typed.seed)
    parts = partitions(typed.data, typed.num_clients, typed.seed, data.train.y)
    assert len(parts) == typed.num_clients
    assert sum(len(p) for p in parts) == typed.data.num_train
    assert model_kwargs(typed.model) == {"hidden": (7,)}
    assert optim_config(typed.client.optimizer).lr == typed.client.optimizer.lr


def test_choice_lists_come_from_the_registries_and_modules():
    from fedbgmd.core import MEMORIES, QUANTIZERS
    from fedbgmd.data import DATA_NAMES
    from fedbgmd.models import MODEL_NAMES
    from fedbgmd.training import OPTIMIZERS

    c = choices()
    assert c["strategy.block.memory"] == tuple(MEMORIES.names())
    assert c["client.quantization.method"] == ("none", *QUANTIZERS.names())
    assert c["data.name"] == DATA_NAMES and c["model.name"] == MODEL_NAMES
    assert c["client.optimizer.name"] == OPTIMIZERS


def test_a_memory_registered_by_a_user_becomes_a_valid_choice():
    from fedbgmd.core import MEMORIES

    cfg = compose_config(["experiment=smoke", "strategy.block.memory=test_mine"])
    with pytest.raises(ConfigError, match=r"strategy\.block\.memory='test_mine' is not one of"):
        validate(cfg)
    MEMORIES.register("test_mine", MEMORIES["mean"])
    try:
        validate(cfg)
    finally:
        MEMORIES.unregister("test_mine")


def test_typed_configs_are_plain_data():  # what Ray pickles to its workers
    typed = to_typed(compose_config(["experiment=smoke"]))
    assert dataclasses.is_dataclass(typed)
    assert all(not OmegaConf.is_config(v) for v in dataclasses.asdict(typed).values())
