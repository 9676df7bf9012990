"""Federated runs that must reduce to something simpler (DESIGN.md item 9)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from fedbgmd.components import generator, load_data, optim_config
from fedbgmd.config import register_configs
from fedbgmd.core import flatten_state
from fedbgmd.engine import run_inprocess
from fedbgmd.models import build_model
from fedbgmd.training import local_train


def cfg_for(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


def test_one_client_fedavg_equals_centralised_sgd(tmp_path):
    rounds = 3
    cfg = cfg_for(
        "num_clients=1", "strategy=fedavg", f"num_rounds={rounds}", "client.local_steps=4"
    )
    run_inprocess(cfg, tmp_path)
    federated = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]

    data = load_data(cfg)
    model = build_model(
        cfg.model.name, data.num_classes, data.input_shape, seed=cfg.seed, hidden=(200,)
    )
    for rnd in range(1, rounds + 1):
        local_train(
            model,
            data.train,
            steps=4,
            batch_size=cfg.client.batch_size,
            optim=optim_config(cfg),
            lr=cfg.client.optimizer.lr,
            generator=generator(cfg.seed, rnd, 0, "batches", "honest"),
            device=torch.device("cpu"),
        )
    central, _ = flatten_state(model.state_dict())
    fed, _ = flatten_state(federated)
    # x - (x - y) equals y up to one float32 rounding per round
    torch.testing.assert_close(fed, central, rtol=0, atol=1e-6)


def test_fedbgmd_with_full_block_and_no_memory_equals_gmd(tmp_path):
    common = ["num_rounds=3", "attack=bit_flip", "attack.fraction=0.2"]
    run_inprocess(cfg_for("strategy=gm", *common), tmp_path / "gm")
    run_inprocess(
        cfg_for(
            "strategy=fedbgmd", "strategy.block.beta=1.0", "strategy.block.memory=none", *common
        ),
        tmp_path / "bgmd",
    )
    a = torch.load(tmp_path / "gm" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "bgmd" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def _metrics(path):
    from fedbgmd.results import read_metrics

    return read_metrics(path)


@pytest.mark.parametrize("attack", ["bit_flip", "label_flip", "malformed", "none"])
def test_batched_inprocess_engine_gives_the_per_client_metrics(tmp_path, attack):
    common = ["num_rounds=3", f"attack={attack}", "client.optimizer.momentum=0.9"]
    if attack != "none":
        common.append("attack.fraction=0.4")
    run_inprocess(cfg_for(*common), tmp_path / "loop")
    run_inprocess(cfg_for(*common, "engine.batched=true"), tmp_path / "batched")
    a, b = _metrics(tmp_path / "loop"), _metrics(tmp_path / "batched")
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert [r["test_loss"] for r in a] == pytest.approx([r["test_loss"] for r in b], rel=1e-5)
    assert [r["replies_rejected"] for r in a] == [r["replies_rejected"] for r in b]
    assert [r["bytes_up"] for r in a] == [r["bytes_up"] for r in b]
