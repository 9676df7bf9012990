"""Tests of fedbgmd.training: schedules, optimiser validation, local SGD, evaluation, device."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedbgmd.data import TensorData, make_synthetic
from fedbgmd.models import build_model
from fedbgmd.training import (
    LocalResult,
    OptimConfig,
    batch_indices,
    evaluate,
    get_device,
    local_train,
    lr_at,
    make_optimizer,
)

CPU = torch.device("cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- schedules


def test_lr_constant() -> None:
    cfg = OptimConfig(lr=0.3)
    assert [lr_at(cfg, t) for t in (0, 5, 500)] == [0.3, 0.3, 0.3]


def test_lr_step() -> None:
    cfg = OptimConfig(lr=0.01, schedule="step", step_gamma=0.9, step_every=2)
    assert lr_at(cfg, 0) == lr_at(cfg, 1) == 0.01
    assert lr_at(cfg, 2) == pytest.approx(0.009)
    assert lr_at(cfg, 7) == pytest.approx(0.01 * 0.9**3)


def test_lr_cosine_matches_torch_scheduler() -> None:
    cfg = OptimConfig(name="adam", lr=1e-3, schedule="cosine", cosine_t_max=10, min_lr=1e-5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5)
    for t in range(11):
        assert lr_at(cfg, t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert lr_at(cfg, 5) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(cfg, 50) == pytest.approx(1e-5)


def test_lr_negative_round_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        lr_at(OptimConfig(), -1)


# ----------------------------------------------------------------------------- optimiser


def test_optim_config_collects_all_errors() -> None:
    with pytest.raises(ValueError) as info:
        OptimConfig(name="rmsprop", schedule="linear", lr=-1.0, step_every=0)
    msg = str(info.value)
    for word in ("rmsprop", "linear", "lr must", "step_every"):
        assert word in msg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nesterov": True}, "nesterov needs momentum"),
        ({"name": "adam", "momentum": 0.9}, "sgd only"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-5}, "weight_decay"),
        ({"step_gamma": 0.0}, "step_gamma"),
        ({"min_lr": 1.0}, "min_lr"),
    ],
)
def test_optim_config_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_make_optimizer_kinds() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    sgd = make_optimizer(p, OptimConfig(momentum=0.9, nesterov=True, weight_decay=1e-5), 0.02)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.02,
        0.9,
        True,
        1e-5,
    )
    assert isinstance(make_optimizer(p, OptimConfig(name="adam"), 1e-3), torch.optim.Adam)
    assert isinstance(make_optimizer(p, OptimConfig(name="adamw"), 1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(p, OptimConfig(), math.nan)


# ----------------------------------------------------------------------------- local_train


def _small() -> tuple[nn.Module, TensorData]:
    ds = make_synthetic(num_train=64, num_test=16, num_features=6, num_classes=3, seed=2)
    return build_model("logreg", 3, ds.input_shape, seed=0), ds.train


def _manual_step(model: nn.Module, data: TensorData, lr: float) -> dict[str, Tensor]:
    """``x − lr·∇L(x)`` for the mean cross-entropy on all of ``data`` (model left unchanged)."""
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(data.x), data.y)
    grads = torch.autograd.grad(loss, list(params.values()))
    # add(alpha=-lr) is the kernel SGD uses; it may fuse the multiply-add (FMA)
    return {k: p.detach().add(g, alpha=-lr) for (k, p), g in zip(params.items(), grads)}


def test_one_sgd_step_equals_manual_gradient_step_exactly() -> None:
    """Centralised equivalence: one local SGD step on one example is exactly x − lr·∇L(x)."""
    model, data = _small()
    one = data.subset(torch.tensor([5]))
    expected = _manual_step(model, one, lr=0.1)
    res, state = local_train(
        model, one, steps=1, batch_size=1, optim=OptimConfig(), lr=0.1,
        generator=_gen(), device=CPU,
    )  # fmt: skip
    assert res == LocalResult(num_examples=1, train_loss=res.train_loss, steps=1)
    assert state is None
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[k])


def test_full_batch_step_equals_gradient_descent() -> None:
    """A full-batch step is one gradient-descent step (up to summation order of the batch)."""
    model, data = _small()
    expected = _manual_step(model, data, lr=0.1)
    local_train(
        model, data, steps=1, batch_size=len(data), optim=OptimConfig(), lr=0.1,
        generator=_gen(), device=CPU,
    )  # fmt: skip
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-5, atol=1e-6)


def test_training_learns_synthetic_task() -> None:
    ds = make_synthetic(seed=0)
    model = build_model("mlp", ds.num_classes, ds.input_shape, seed=0, hidden=(32,))
    loss0, acc0 = evaluate(model, ds.test, device=CPU)
    res, _ = local_train(
        model, ds.train, epochs=2, batch_size=64, optim=OptimConfig(momentum=0.9), lr=0.05,
        generator=_gen(), device=CPU,
    )  # fmt: skip
    loss1, acc1 = evaluate(model, ds.test, device=CPU)
    assert res.steps == 2 * math.ceil(2000 / 64) and res.num_examples == 2000
    assert loss1 < loss0 / 2 and acc1 > 0.8 and acc1 > acc0


def test_cnn_path_trains_on_image_shaped_data() -> None:
    ds = make_synthetic(num_train=64, num_test=16, shape=(1, 16, 16), seed=0)
    model = build_model("cnn", ds.num_classes, ds.input_shape, seed=0)
    res, _ = local_train(
        model, ds.train, steps=3, batch_size=16, optim=OptimConfig(), lr=0.01,
        generator=_gen(), device=CPU,
    )  # fmt: skip
    assert res.steps == 3 and math.isfinite(res.train_loss)


def _run(seed: int, **kw: object) -> tuple[list[Tensor], LocalResult]:
    ds = make_synthetic(num_train=100, num_test=10, num_features=8, seed=1)
    model = build_model("mlp", ds.num_classes, ds.input_shape, seed=0, hidden=(16,), dropout=0.5)
    res, _ = local_train(
        model, ds.train, steps=7, batch_size=16, optim=OptimConfig(), lr=0.1,
        generator=_gen(seed), device=CPU, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return [p.detach().clone() for p in model.parameters()], res


def test_deterministic_for_generator_seed_including_dropout() -> None:
    state = torch.get_rng_state()
    (a, ra), (b, rb), (c, _) = _run(3), _run(3), _run(4)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert ra == rb and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_transform_applied_to_every_batch() -> None:
    seen: list[int] = []

    def flip(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(len(y))
        return x * 0.0, torch.zeros_like(y)

    params, _ = _run(0, transform=flip)
    assert seen == [16] * 7
    untouched, _ = _run(0)
    assert not all(torch.equal(x, y) for x, y in zip(params, untouched))


def test_steps_sample_without_replacement_then_reshuffle() -> None:
    n = 10
    data = TensorData(
        torch.arange(n, dtype=torch.float32).view(n, 1), torch.zeros(n, dtype=torch.int64)
    )
    batches: list[Tensor] = []

    def record(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        batches.append(x.view(-1).long())
        return x, y

    local_train(
        nn.Linear(1, 2), data, steps=6, batch_size=4, optim=OptimConfig(), lr=0.0,
        generator=_gen(), device=CPU, transform=record,
    )  # fmt: skip
    assert all(len(b) == 4 for b in batches)
    for pair in (batches[0:2], batches[2:4], batches[4:6]):  # 2 batches per permutation
        assert len(torch.cat(pair).unique()) == 8


def test_epochs_cover_each_example_once() -> None:
    n = 10
    data = TensorData(
        torch.arange(n, dtype=torch.float32).view(n, 1), torch.zeros(n, dtype=torch.int64)
    )
    seen: list[Tensor] = []

    def record(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(x.view(-1).long())
        return x, y

    res, _ = local_train(
        nn.Linear(1, 2), data, epochs=1, batch_size=4, optim=OptimConfig(), lr=0.0,
        generator=_gen(), device=CPU, transform=record,
    )  # fmt: skip
    assert res.steps == 3 and [len(s) for s in seen] == [4, 4, 2]
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))


def test_momentum_state_persists_and_is_not_mutated() -> None:
    model, data = _small()
    cfg = OptimConfig(momentum=0.9)
    kw = {"steps": 2, "batch_size": 16, "optim": cfg, "lr": 0.1, "device": CPU}
    _, state = local_train(model, data, generator=_gen(), **kw)  # type: ignore[arg-type]
    assert state is not None and state["state"]
    saved = {k: v["momentum_buffer"].clone() for k, v in state["state"].items()}
    _, state2 = local_train(
        model,
        data,
        generator=_gen(),
        optimizer_state=state,
        **kw,  # type: ignore[arg-type]
    )
    assert all(torch.equal(state["state"][k]["momentum_buffer"], v) for k, v in saved.items())
    assert state2 is not None
    assert not torch.equal(state2["state"][0]["momentum_buffer"], saved[0])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": 1, "epochs": 1.0}, "exactly one"),
        ({}, "exactly one"),
        ({"steps": 0}, "steps"),
        ({"epochs": -1.0}, "epochs"),
        ({"steps": 1, "batch_size": 0}, "batch_size"),
    ],
)
def test_local_train_bad_args(kw: dict, match: str) -> None:
    model, data = _small()
    args = {"batch_size": 8, "optim": OptimConfig(), "lr": 0.1, "generator": _gen(), "device": CPU}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        local_train(model, data, **args)


# ----------------------------------------------------------------------------- evaluate / device


def test_evaluate_values_and_restores_mode() -> None:
    model, data = _small()
    model.train()
    loss, acc = evaluate(model, data, batch_size=10, device=CPU)
    assert model.training
    with torch.no_grad():
        logits = model(data.x)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, data.y)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))
    model.eval()
    evaluate(model, data, device=CPU)
    assert not model.training


def test_evaluate_restores_mixed_submodule_modes() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    model.train()
    model[1].eval()
    evaluate(model, _small()[1], device=CPU)
    assert [m.training for m in model] == [True, False, True]


def test_get_device() -> None:
    assert get_device("cpu") == CPU
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_train_and_evaluate_on_cuda_deterministic() -> None:
    """GPU path: data moved once, dropout seeded from the generator, global CUDA RNG untouched."""
    dev = get_device("cuda")
    ds = make_synthetic(num_train=256, num_test=64, shape=(1, 16, 16), seed=0)
    cuda_state = torch.cuda.get_rng_state(dev)
    runs = []
    for _ in range(2):
        model = build_model("cnn", ds.num_classes, ds.input_shape, seed=0).to(dev)
        res, _ = local_train(
            model, ds.train, steps=5, batch_size=32, optim=OptimConfig(momentum=0.9), lr=0.01,
            generator=_gen(1), device=dev,
        )  # fmt: skip
        loss, acc = evaluate(model, ds.test, device=dev)
        runs.append((res, [p.detach().cpu() for p in model.parameters()], loss, acc))
    assert torch.equal(torch.cuda.get_rng_state(dev), cuda_state)
    # same batches and dropout masks; cuDNN conv backward may differ in the last bits
    assert runs[0][0].steps == runs[1][0].steps == 5
    assert runs[0][0].train_loss == pytest.approx(runs[1][0].train_loss, rel=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(p.device.type == "cpu" for p in runs[0][1]) and 0.0 <= runs[0][3] <= 1.0


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(),
        OptimConfig(weight_decay=1e-2),
        OptimConfig(momentum=0.9),
        OptimConfig(momentum=0.9, nesterov=True, weight_decay=1e-5),
    ],
    ids=["plain", "wd", "momentum", "nesterov-wd"],
)
def test_local_train_sgd_is_bitwise_torch_optim_sgd(cfg: OptimConfig) -> None:
    """local_train's SGD (no optimiser class) gives torch.optim.SGD's parameters and buffers."""
    ds = make_synthetic(num_train=64, num_test=16, num_features=6, num_classes=3, seed=2)
    model, data = build_model("mlp", 3, ds.input_shape, seed=0, hidden=(16, 8)), ds.train
    ref = copy.deepcopy(model)
    kw = {"steps": 5, "batch_size": 8, "optim": cfg, "lr": 0.05, "device": CPU}
    _, state = local_train(model, data, generator=_gen(), **kw)  # type: ignore[arg-type]
    opt = torch.optim.SGD(
        ref.parameters(), lr=0.05, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    for idx in batch_indices(len(data), 8, 5, None, _gen()):
        loss = F.cross_entropy(ref(data.x[idx]), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if cfg.momentum:
        assert state is not None
        for i, q in enumerate(ref.parameters()):
            assert torch.equal(
                state["state"][i]["momentum_buffer"], opt.state[q]["momentum_buffer"]
            )
    else:
        assert state is None


def test_local_train_sgd_does_not_import_dynamo() -> None:
    """The start-up cost the class-free SGD avoids (torch.optim imports torch._dynamo)."""
    code = (
        "import sys, torch\n"
        "from fedbgmd.data import make_synthetic\n"
        "from fedbgmd.models import build_model\n"
        "from fedbgmd.training import OptimConfig, local_train\n"
        "ds = make_synthetic(num_train=64, num_test=8)\n"
        "m = build_model('mlp', ds.num_classes, ds.input_shape, seed=0)\n"
        "local_train(m, ds.train, steps=2, batch_size=8, lr=0.1, device=torch.device('cpu'),\n"
        "            optim=OptimConfig(momentum=0.9, nesterov=True, weight_decay=1e-5),\n"
        "            generator=torch.Generator().manual_seed(0))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_optimizer_state_rejects_foreign_buffers() -> None:
    model, data = _small()
    kw = {"steps": 1, "batch_size": 8, "optim": OptimConfig(momentum=0.9), "lr": 0.1}
    bad = {"state": {99: {"momentum_buffer": torch.zeros(3)}}}
    with pytest.raises(ValueError, match="no SGD momentum buffer"):
        local_train(model, data, generator=_gen(), device=CPU, optimizer_state=bad, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no 'state' key"):
        local_train(model, data, generator=_gen(), device=CPU, optimizer_state={}, **kw)  # type: ignore[arg-type]
