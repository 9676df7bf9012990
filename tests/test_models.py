"""Tests of fedbgmd.models: exact parameter counts, shapes, torch.func compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedbgmd.models import MODEL_NAMES, build_model, count_parameters


def test_cnn_has_authors_parameter_count() -> None:
    assert count_parameters(build_model("cnn", 10, (1, 28, 28))) == 1_163_978


def test_resnet18_cifar_parameter_count() -> None:
    model = build_model("resnet18", 10, (3, 32, 32))
    assert count_parameters(model) == 11_173_962
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (1, 28, 28)),
        ("cnn", (3, 32, 32)),
        ("mlp", (1, 28, 28)),
        ("mlp", (32,)),
        ("logreg", (3, 32, 32)),
        ("resnet18", (3, 32, 32)),
    ],
)
def test_forward_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, 7, shape, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and out.dtype == torch.float32


def test_mlp_hidden_sizes_configurable() -> None:
    model = build_model("mlp", 10, (32,), hidden=(16, 8))
    assert count_parameters(model) == 32 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert count_parameters(build_model("mlp", 10, (32,))) == 32 * 200 + 200 + 200 * 10 + 10


def test_logreg_parameter_count() -> None:
    assert count_parameters(build_model("logreg", 4, (1, 8, 8))) == 64 * 4 + 4


def test_seed_gives_identical_init_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a, b = build_model("cnn", 10, (1, 28, 28), seed=7), build_model("cnn", 10, (1, 28, 28), seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model("cnn", 10, (1, 28, 28), seed=8)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match="cnn, resnet18, mlp, logreg"):
        build_model("vgg", 10, (3, 32, 32))
    assert set(MODEL_NAMES) == {"cnn", "resnet18", "mlp", "logreg"}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("cnn", 10, (1, 8, 8)), {}, "16×16"),
        (("cnn", 10, (784,)), {}, "C×H×W"),
        (("logreg", 0, (4,)), {}, "num_classes"),
        (("mlp", 10, (4,)), {"depth": 3}, "depth"),
    ],
)
def test_build_model_bad_args(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 16, 16)), ("mlp", (1, 8, 8))])
def test_functional_call_vmap_over_param_copies(name: str, shape: tuple[int, ...]) -> None:
    """Three stacked parameter copies evaluated (and differentiated) in one vmap."""
    model = build_model(name, 4, shape, seed=0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, 2 * v, -v]) for k, v in params.items()}
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0])

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    model.eval()
    out = vmap(lambda p: functional_call(model, p, (x,)))(stacked)
    assert out.shape == (3, 5, 4)
    with torch.no_grad():
        assert torch.allclose(out[0], model(x), atol=1e-5)
    grads = vmap(grad(loss), in_dims=(0, None, None))(stacked, x, y)
    assert grads.keys() == params.keys()
    assert all(grads[k].shape == stacked[k].shape for k in params)
    # per-copy gradients match the eager ones for copy 0
    model.zero_grad()
    loss(dict(model.named_parameters()), x, y).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None
        assert torch.allclose(grads[k][0], p.grad, atol=1e-5)
    # train mode (dropout in cnn) works with per-copy randomness
    model.train()
    out = vmap(lambda p: functional_call(model, p, (x,)), randomness="different")(stacked)
    assert out.shape == (3, 5, 4)
