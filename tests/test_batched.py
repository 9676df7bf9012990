"""BatchedTrainer (vmapped local SGD) against the per-client loop ``local_train``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fedbgmd.batched import BatchedTrainer
from fedbgmd.core import flatten_state, unflatten_state
from fedbgmd.data import TensorData, make_synthetic
from fedbgmd.models import build_model
from fedbgmd.training import OptimConfig, Transform, local_train

CPU = torch.device("cpu")
SIZES = (40, 25, 7, 16, 33)  # unequal partitions; 7 < batch_size 16 gives a smaller batch


@pytest.fixture(scope="module")
def parts() -> list[TensorData]:
    ds = make_synthetic(num_train=sum(SIZES), num_test=10, seed=3)
    out, start = [], 0
    for n in SIZES:
        out.append(ds.train.subset(torch.arange(start, start + n)))
        start += n
    return out


def _model(name: str) -> nn.Module:
    kw = {"hidden": (24, 12)} if name == "mlp" else {}
    return build_model(name, 4, (32,), seed=0, **kw)


def _gens(seed: int = 0, n: int = len(SIZES)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * seed + i) for i in range(n)]


def _loop(
    model: nn.Module,
    datas: list[TensorData],
    optim: OptimConfig,
    steps: int,
    lr: float,
    transforms: list[Transform | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference: local_train per client from the same x0, update = x0 − y."""
    x0, spec = flatten_state(model.state_dict())
    x0 = x0.clone()
    ups, losses = [], []
    for i, (data, g) in enumerate(zip(datas, _gens())):
        model.load_state_dict(unflatten_state(x0, spec))
        res, _ = local_train(
            model,
            data,
            steps=steps,
            batch_size=16,
            optim=optim,
            lr=lr,
            generator=g,
            device=CPU,
            transform=None if transforms is None else transforms[i],
        )
        ups.append(x0 - flatten_state(model.state_dict())[0])
        losses.append(res.train_loss)
    model.load_state_dict(unflatten_state(x0, spec))
    return torch.stack(ups), torch.tensor(losses, dtype=torch.float64)


def _batched(
    model: nn.Module,
    datas: list[TensorData],
    optim: OptimConfig,
    steps: int,
    lr: float,
    transforms: list[Transform | None] | None = None,
    max_chunk: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    trainer = BatchedTrainer(
        model, optim=optim, batch_size=16, steps=steps, device=CPU, max_chunk=max_chunk
    )
    x0, _ = flatten_state(model.state_dict())
    return trainer.train(x0, datas, _gens(seed, len(datas)), lr, transforms)


def _close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    assert err < rel, f"relative error {err:.3g}"


OPTIMS = {
    "plain": OptimConfig(),
    "nesterov_wd": OptimConfig(momentum=0.9, nesterov=True, weight_decay=5e-3),
    "momentum": OptimConfig(momentum=0.5),
}


@pytest.mark.parametrize("name", ["mlp", "logreg"])
@pytest.mark.parametrize("optim", list(OPTIMS))
@pytest.mark.parametrize("steps", [1, 3])
def test_matches_per_client_loop(
    parts: list[TensorData], name: str, optim: str, steps: int
) -> None:
    model = _model(name)
    ref_u, ref_l = _loop(model, parts, OPTIMS[optim], steps, lr=0.1)
    u, loss = _batched(model, parts, OPTIMS[optim], steps, lr=0.1)
    assert u.shape == ref_u.shape and loss.shape == (len(parts),)
    assert loss.dtype == torch.float64
    for i in range(len(parts)):
        _close(u[i], ref_u[i])
    torch.testing.assert_close(loss, ref_l, rtol=1e-5, atol=1e-6)


def test_equal_sizes_and_many_steps_wrap_permutation(parts: list[TensorData]) -> None:
    """Steps beyond one pass draw a new permutation exactly like local_train."""
    datas = [parts[0], parts[4]]  # 40 and 33 samples; 5 steps of 16 wrap around
    model = _model("mlp")
    ref_u, _ = _loop(model, datas, OPTIMS["nesterov_wd"], 5, lr=0.05)
    u, _ = _batched(model, datas, OPTIMS["nesterov_wd"], 5, lr=0.05)
    for i in range(2):
        _close(u[i], ref_u[i])


def test_deterministic_and_model_untouched(parts: list[TensorData]) -> None:
    model = _model("mlp")
    before = flatten_state(model.state_dict())[0].clone()
    model.eval()
    a = _batched(model, parts, OPTIMS["momentum"], 3, lr=0.1)
    b = _batched(model, parts, OPTIMS["momentum"], 3, lr=0.1)
    c = _batched(model, parts, OPTIMS["momentum"], 3, lr=0.1, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(flatten_state(model.state_dict())[0], before)
    assert not model.training  # mode restored


def test_dropout_reproducible_and_random(parts: list[TensorData]) -> None:
    """With dropout the batched run is reproducible; masks differ between clients."""
    model = build_model("mlp", 4, (32,), seed=0, hidden=(24,), dropout=0.5)
    same = [parts[0]] * 4
    gens = [torch.Generator().manual_seed(7) for _ in range(4)]  # identical batches
    trainer = BatchedTrainer(model, optim=OptimConfig(), batch_size=16, steps=2, device=CPU)
    x0, _ = flatten_state(model.state_dict())
    u1, _ = trainer.train(x0, same, gens, 0.1)
    u2, _ = trainer.train(x0, same, [torch.Generator().manual_seed(7) for _ in range(4)], 0.1)
    assert torch.equal(u1, u2)
    assert not torch.equal(u1[0], u1[1])  # different dropout masks per client
    # an eval-mode-free comparison: without dropout identical clients give identical updates
    trainer0 = BatchedTrainer(
        _model("mlp"), optim=OptimConfig(), batch_size=16, steps=2, device=CPU
    )
    x1, _ = flatten_state(_model("mlp").state_dict())
    v, _ = trainer0.train(x1, same, [torch.Generator().manual_seed(7) for _ in range(4)], 0.1)
    torch.testing.assert_close(v[0], v[1])


def test_transform_applied(parts: list[TensorData]) -> None:
    def flip(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return -x, (3 - y)

    tfs: list[Transform | None] = [None, flip, None, flip, None]
    model = _model("logreg")
    ref_u, ref_l = _loop(model, parts, OPTIMS["plain"], 2, 0.1, tfs)
    u, loss = _batched(model, parts, OPTIMS["plain"], 2, 0.1, tfs)
    plain, _ = _batched(model, parts, OPTIMS["plain"], 2, 0.1)
    for i in range(len(parts)):
        _close(u[i], ref_u[i])
    torch.testing.assert_close(loss, ref_l, rtol=1e-5, atol=1e-6)
    assert torch.equal(u[0], plain[0]) and not torch.allclose(u[1], plain[1])


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunking_same_result(parts: list[TensorData], chunk: int) -> None:
    model = _model("mlp")
    full = _batched(model, parts, OPTIMS["nesterov_wd"], 3, lr=0.1)
    part = _batched(model, parts, OPTIMS["nesterov_wd"], 3, lr=0.1, max_chunk=chunk)
    for i in range(len(parts)):
        _close(part[0][i], full[0][i], rel=1e-6)
    torch.testing.assert_close(part[1], full[1])


def test_generators_consumed_like_local_train(parts: list[TensorData]) -> None:
    model = _model("logreg")
    g_loop, g_batch = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    local_train(
        model, parts[1], steps=3, batch_size=16, optim=OPTIMS["plain"], lr=0.0, generator=g_loop,
        device=CPU,
    )  # fmt: skip
    trainer = BatchedTrainer(model, optim=OPTIMS["plain"], batch_size=16, steps=3, device=CPU)
    trainer.train(flatten_state(model.state_dict())[0], [parts[1]], [g_batch], 0.0)
    assert torch.equal(g_loop.get_state(), g_batch.get_state())


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_not_implemented(name: str) -> None:
    with pytest.raises(NotImplementedError, match="sgd"):
        BatchedTrainer(
            _model("logreg"), optim=OptimConfig(name=name), batch_size=8, steps=1, device=CPU
        )


def test_buffers_not_implemented() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(NotImplementedError, match="buffers"):
        BatchedTrainer(model, optim=OptimConfig(), batch_size=8, steps=1, device=CPU)


def test_bad_arguments(parts: list[TensorData]) -> None:
    with pytest.raises(ValueError, match="steps"):
        BatchedTrainer(_model("logreg"), optim=OptimConfig(), batch_size=8, steps=0, device=CPU)
    trainer = BatchedTrainer(
        _model("logreg"), optim=OptimConfig(), batch_size=8, steps=1, device=CPU
    )
    with pytest.raises(ValueError, match="generators"):
        trainer.train(torch.zeros(trainer.dim), parts, _gens(n=2), 0.1)
    with pytest.raises(ValueError, match="x_t"):
        trainer.train(torch.zeros(3), parts, _gens(), 0.1)


class _WithUnused(nn.Module):
    """A model with a parameter the loss never reaches (e.g. a head kept for later)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(32, 4)
        self.spare = nn.Linear(32, 4)  # unused in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize("optim", list(OPTIMS))
@pytest.mark.parametrize("steps", [1, 3])
def test_unused_parameters_are_left_alone_like_torch_sgd(
    parts: list[TensorData], optim: str, steps: int
) -> None:
    """torch.optim.SGD skips parameters without a gradient (no weight decay, no momentum)."""
    model = _WithUnused()
    ref_u, ref_l = _loop(model, parts, OPTIMS[optim], steps, lr=0.1)
    u, loss = _batched(model, parts, OPTIMS[optim], steps, lr=0.1)
    spare = slice(4 * 32 + 4, None)  # flatten order: body.weight, body.bias, spare.*
    assert torch.equal(ref_u[:, spare], torch.zeros_like(ref_u[:, spare]))
    assert torch.equal(u[:, spare], ref_u[:, spare])
    for i in range(len(parts)):
        _close(u[i], ref_u[i])
    torch.testing.assert_close(loss, ref_l, rtol=1e-5, atol=1e-6)
