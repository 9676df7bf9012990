"""Federated runs that must reduce to something simpler (DESIGN.md item 9)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from fedbgmd.config import register_configs
from fedbgmd.core import flatten_state
from fedbgmd.engine import run_inprocess
from fedbgmd.models import build_model
from fedbgmd.seeding import generator
from fedbgmd.training import local_train
from fedbgmd.workload import load_data, optim_config


def cfg_for(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        # checkpoint_last: the final model is what these tests compare
        return compose("config", overrides=["experiment=smoke", "checkpoint_last=true", *overrides])


def test_one_client_fedavg_equals_centralised_sgd(tmp_path):
    rounds = 3
    cfg = cfg_for(
        "num_clients=1", "strategy=fedavg", f"num_rounds={rounds}", "client.local_steps=4"
    )
    run_inprocess(cfg, tmp_path)
    federated = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]

    data = load_data(cfg.data, cfg.seed)
    model = build_model(
        cfg.model.name, data.num_classes, data.input_shape, seed=cfg.seed, hidden=(200,)
    )
    for rnd in range(1, rounds + 1):
        local_train(
            model,
            data.train,
            steps=4,
            batch_size=cfg.client.batch_size,
            optim=optim_config(cfg.client.optimizer),
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
    from fedbgmd.reporting.writer import read_metrics

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


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
@pytest.mark.parametrize("attack", ["bit_flip", "malformed", "none"])
def test_inprocess_device_references_give_the_serialised_run(
    tmp_path, attack, batched, monkeypatch
):
    """engine.device_resident: model and replies by reference, same run as through bytes.

    Bitwise equal checkpoints also show that no client wrote into the server's model (which
    it reads by reference)."""
    from fedbgmd.wire import DEVICE_STORE

    common = ["num_rounds=3", f"attack={attack}", "client.optimizer.momentum=0.9"]
    common += [f"engine.batched={batched}", "checkpoint_every=2"]
    if attack != "none":
        common.append("attack.fraction=0.4")
    put, share = DEVICE_STORE.put, DEVICE_STORE.share
    refs: list[str] = []
    monkeypatch.setattr(DEVICE_STORE, "put", lambda t: refs.append("up") or put(t))
    monkeypatch.setattr(DEVICE_STORE, "share", lambda t: refs.append("down") or share(t))
    run_inprocess(cfg_for(*common, "engine.device_resident=false"), tmp_path / "bytes")
    assert refs == []
    run_inprocess(cfg_for(*common), tmp_path / "ref")
    # 3 rounds x 5 clients, less the 2 whose message attack needs a serialised reply
    assert refs.count("up") == 3 * (5 - 2 * (attack == "malformed"))
    assert refs.count("down") == 3
    a = torch.load(tmp_path / "bytes" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    assert a["round"] == b["round"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["strategy"]["x"], b["strategy"]["x"])
    ma, mb = _metrics(tmp_path / "bytes"), _metrics(tmp_path / "ref")
    for key in ("test_accuracy", "test_loss", "replies_rejected", "bytes_up", "bytes_down"):
        assert [r[key] for r in ma] == [r[key] for r in mb], key


def test_client_decodes_the_global_model_once_per_record():
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedbgmd.clients.honest import runtime_for
    from fedbgmd.engine import set_server_identity

    def message(arrays: ArrayRecord) -> Message:
        return Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), 1000, "train")

    set_server_identity()
    runtime = runtime_for(cfg_for("num_clients=2"))
    state = runtime.model.state_dict()
    first = ArrayRecord(state)
    x0 = runtime.global_model(message(first))
    assert runtime.global_model(message(first)) is x0  # same record: no new decode
    second = ArrayRecord({k: v + 1 for k, v in state.items()})
    x1 = runtime.global_model(message(second))
    assert x1 is not x0 and torch.equal(x1, x0 + 1)
    bogus = Message(
        RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"model-ref": "nope"})}),
        1000,
        "train",
    )
    with pytest.raises(LookupError, match="unknown model reference"):
        runtime.global_model(bogus)
