"""Local training and evaluation of a torch model (pure torch; no flwr, no hydra).

Why: honest clients, Byzantine clients and the centralised baseline all run the same local-SGD
loop, so the learning-rate schedule, batching and randomness are defined once.

Randomness is explicit: mini-batch order **and** dropout masks come from the ``generator``
passed to :func:`local_train` (dropout runs under a forked global RNG seeded from it, which is
restored afterwards), so one ``(seed, round, client)`` generator fixes a client's whole update.

Example::

    >>> from fedbgmd.data import make_synthetic
    >>> from fedbgmd.models import build_model
    >>> ds = make_synthetic(num_train=200, num_test=50)
    >>> model = build_model("logreg", ds.num_classes, ds.input_shape, seed=0)
    >>> res, _ = local_train(model, ds.train, epochs=1, batch_size=32, optim=OptimConfig(),
    ...                      lr=0.1, generator=torch.Generator().manual_seed(0),
    ...                      device=torch.device("cpu"))
    >>> res.steps
    7
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.sgd import sgd as sgd_update  # the function SGD.step calls

from fedbgmd.data import TensorData

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "LocalResult",
    "OptimConfig",
    "batch_indices",
    "evaluate",
    "get_device",
    "local_train",
    "lr_at",
    "make_optimizer",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")

Transform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class OptimConfig:
    """Client optimiser and learning-rate schedule.

    Why: the seed's three setups (SGD+Nesterov+StepLR, Adam+cosine, SGD+cosine) are all points
    of this one schema; every field is validated at construction (all errors in one message).

    Attributes:
        name: ``"sgd"`` | ``"adam"`` | ``"adamw"``.
        lr: base learning rate γ₀ >= 0.
        momentum: SGD momentum in [0, 1) (must be 0 for Adam/AdamW).
        nesterov: Nesterov momentum (SGD with ``momentum > 0`` only).
        weight_decay: L2 penalty (decoupled for AdamW) >= 0.
        schedule: ``"constant"`` | ``"step"`` | ``"cosine"`` (see :func:`lr_at`).
        step_gamma: step decay factor in (0, 1]; ``step_every``: decay period (rounds/epochs).
        cosine_t_max: cosine period T >= 1; ``min_lr``: floor of the cosine in [0, lr].
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_gamma: float = 0.9
    step_every: int = 1
    cosine_t_max: int = 100
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        errors = self.errors()
        if errors:
            raise ValueError("OptimConfig: " + "; ".join(errors))

    def errors(self) -> list[str]:
        """Every problem with this configuration (empty when valid)."""
        e: list[str] = []
        if self.name not in OPTIMIZERS:
            e.append(f"name {self.name!r} unknown; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            e.append(f"schedule {self.schedule!r} unknown; valid: {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            e.append(f"lr must be finite and >= 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            e.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.name != "sgd" and (self.momentum != 0 or self.nesterov):
            e.append(f"momentum/nesterov apply to sgd only (name={self.name!r})")
        if self.nesterov and self.momentum <= 0:
            e.append("nesterov needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            e.append(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 < self.step_gamma <= 1:
            e.append(f"step_gamma must be in (0, 1], got {self.step_gamma}")
        if self.step_every < 1:
            e.append(f"step_every must be >= 1, got {self.step_every}")
        if self.cosine_t_max < 1:
            e.append(f"cosine_t_max must be >= 1, got {self.cosine_t_max}")
        if not 0 <= self.min_lr <= self.lr:
            e.append(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        return e


def lr_at(cfg: OptimConfig, round_or_epoch: int) -> float:
    """Learning rate at round/epoch ``t`` (0-based) — a pure function of ``(cfg, t)``.

    Why: the server broadcasts γ_t each round; clients rebuild their optimiser, so the schedule
    cannot live in a stateful torch scheduler.

    * constant: ``γ_t = lr``
    * step: ``γ_t = lr · step_gamma^{⌊t / step_every⌋}`` (torch ``StepLR``)
    * cosine: ``γ_t = min_lr + (lr − min_lr)·(1 + cos(π·min(t, T)/T))/2`` with
      ``T = cosine_t_max`` (torch ``CosineAnnealingLR``'s closed form; held at ``min_lr`` after T)
    """
    t = int(round_or_epoch)
    if t < 0:
        raise ValueError(f"lr_at: round_or_epoch must be >= 0, got {round_or_epoch}")
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (t // cfg.step_every)
    frac = min(t, cfg.cosine_t_max) / cfg.cosine_t_max
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _check_optim(cfg: OptimConfig, lr: float) -> None:
    errors = cfg.errors()
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
        errors.append(f"lr must be a finite number >= 0, got {lr!r}")
    if errors:
        raise ValueError("make_optimizer: " + "; ".join(errors))


def make_optimizer(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """A torch optimiser for ``params`` with ``cfg``'s hyper-parameters and learning rate ``lr``.

    Why: ``lr`` comes from :func:`lr_at` for the current round, the rest from the config.

    Raises:
        ValueError: ``lr`` negative or not finite, or an invalid ``cfg`` (see ``cfg.errors()``).
    """
    _check_optim(cfg, lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


class _SGD:
    """``torch.optim.SGD`` (dampening 0) for :func:`local_train`, without the class.

    Why: the first call of any ``torch.optim.Optimizer`` method imports ``torch._dynamo``
    (its methods are wrapped in ``torch._disable_dynamo``), 2.5-3.5 s of every process's start
    on a 2-core CPU. The update itself is ``torch.optim.sgd.sgd`` (public, in its module's
    ``__all__``), the function ``SGD.step`` calls, with the same arguments, so the results are
    bitwise those of ``torch.optim.SGD`` (tested). ``state_dict()`` has SGD's layout for the
    momentum buffers.
    """

    def __init__(self, params: Iterable[Tensor], cfg: OptimConfig, lr: float) -> None:
        self.params = list(params)
        self.cfg, self.lr = cfg, lr
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        bufs = [self.buffers[i] for i in live]
        sgd_update(
            params,
            grads,  # type: ignore[arg-type]
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads if g is not None),
            weight_decay=self.cfg.weight_decay,
            momentum=self.cfg.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=self.cfg.nesterov,
            maximize=False,
        )
        if self.cfg.momentum != 0:
            for i, buf in zip(live, bufs):
                self.buffers[i] = buf

    def state_dict(self) -> dict[str, Any]:
        state = {i: {"momentum_buffer": b} for i, b in enumerate(self.buffers) if b is not None}
        return {"state": state, "param_groups": [{"params": list(range(len(self.params)))}]}

    def load_buffers(self, saved: dict[str, Any]) -> None:
        """Momentum buffers of an earlier ``state_dict()`` (cloned; hyper-parameters not read)."""
        for k, s in saved["state"].items():
            i = int(k)
            if not 0 <= i < len(self.params) or "momentum_buffer" not in s:
                raise ValueError(f"optimizer_state: no SGD momentum buffer for parameter {k!r}")
            buf = s["momentum_buffer"]
            if buf is not None and buf.shape != self.params[i].shape:
                raise ValueError(f"optimizer_state: buffer {k} has shape {tuple(buf.shape)}")
            self.buffers[i] = None if buf is None else buf.detach().clone()


@dataclass(frozen=True)
class LocalResult:
    """Summary of one client's local training.

    Why: FedAvg weights by ``num_examples``; ``train_loss`` is a logged metric.

    Attributes:
        num_examples: size of the client's data set.
        train_loss: mean of the per-step mini-batch losses.
        steps: optimiser steps taken.
    """

    num_examples: int
    train_loss: float
    steps: int


def batch_indices(
    n: int, batch_size: int, steps: int | None, epochs: float | None, g: torch.Generator
) -> Iterator[Tensor]:
    """Mini-batch index tensors (int64, on ``g``'s device) drawn with ``g``; ``b = min(batch_size, n)``.

    ``epochs``: a fresh permutation per epoch, cut into ``⌈n/b⌉`` batches (last one smaller);
    a fractional epoch count gives ``round(epochs·⌈n/b⌉)`` batches (at least one).
    ``steps``: batches of ``b`` drawn without replacement from a permutation; when fewer than
    ``b`` remain, the leftovers are dropped and a new permutation starts.
    """
    b = min(batch_size, n)
    if epochs is None:
        perm, pos = torch.randperm(n, generator=g, device=g.device), 0
        for _ in range(steps or 0):
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=g, device=g.device), 0
            yield perm[pos : pos + b]
            pos += b
        return
    remaining = max(1, round(epochs * math.ceil(n / b)))
    while remaining > 0:
        chunks = torch.randperm(n, generator=g, device=g.device).split(b)
        yield from chunks[:remaining]
        remaining -= len(chunks)


_batches = batch_indices  # the former private name


def _check_local_args(
    data: TensorData, steps: int | None, epochs: float | None, batch_size: int
) -> None:
    """Collect every argument error of :func:`local_train` and raise once."""
    errors = []
    if (steps is None) == (epochs is None):
        errors.append("give exactly one of steps / epochs")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        errors.append(f"steps must be an int >= 1, got {steps!r}")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        errors.append(f"epochs must be finite and > 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        errors.append(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(data) == 0:
        errors.append("the client has no data")
    if errors:
        raise ValueError("local_train: " + "; ".join(errors))


@contextlib.contextmanager
def _rng_from(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of ``device`` from ``generator`` inside a fork (dropout masks).

    Why: ``nn.Dropout`` draws from the global RNG; forking keeps the caller's state intact.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def local_train(
    model: nn.Module,
    data: TensorData,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int,
    optim: OptimConfig,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
    transform: Transform | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> tuple[LocalResult, dict[str, Any] | None]:
    """Train ``model`` in place on ``data`` for ``steps`` mini-batches or ``epochs`` epochs.

    Why: the client half of FL-BGMD (H local steps from x_t) and the centralised baseline.

    Minimises the mean cross-entropy with the optimiser ``make_optimizer(model.parameters(),
    optim, lr)`` would build (for SGD the same update without the class, see :class:`_SGD`).
    Mini-batches (see :func:`batch_indices`) and dropout masks come from ``generator`` (CPU or
    device generator; a CPU one gives the same batches on every machine). ``transform(x, y) -> (x', y')`` is applied to every batch before the forward
    pass (feature / label attacks). ``data`` is moved to ``device`` once; ``model`` must
    already be there.

    Args:
        optimizer_state: a state returned by an earlier call; its buffers (momentum, Adam
            moments) are copied in first, hyper-parameters come from ``optim`` / ``lr``.

    Returns:
        ``(LocalResult, state)`` where ``state`` is the optimiser's ``state_dict()`` to persist
        momentum across rounds, or ``None`` for plain SGD (momentum 0), which has none.
    """
    _check_local_args(data, steps, epochs, batch_size)
    optimizer: torch.optim.Optimizer | _SGD
    if optim.name == "sgd":
        _check_optim(optim, lr)
        optimizer = _SGD(model.parameters(), optim, lr)
    else:
        optimizer = make_optimizer(model.parameters(), optim, lr)
    if optimizer_state is not None:
        if "state" not in optimizer_state:
            raise ValueError("optimizer_state must be an optimizer state_dict (no 'state' key)")
        if isinstance(optimizer, _SGD):
            optimizer.load_buffers(optimizer_state)
        else:
            _load_buffers(optimizer, optimizer_state)
    x, y = data.x.to(device), data.y.to(device)
    model.train()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    batches = list(batch_indices(len(data), batch_size, steps, epochs, generator))
    # one host-to-device copy of all batch indices instead of one per step
    all_idx = torch.cat(batches).to(device).split([len(b) for b in batches])
    with _rng_from(generator, device):
        for idx in all_idx:
            xb, yb = x[idx], y[idx]
            if transform is not None:
                xb, yb = transform(xb, yb)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
    result = LocalResult(num_examples=len(data), train_loss=float(total) / count, steps=count)
    keep = optim.name != "sgd" or optim.momentum > 0
    return result, (optimizer.state_dict() if keep else None)


def _load_buffers(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Copy the per-parameter buffers of ``saved`` into ``optimizer`` (not its hyper-params).

    Tensors are cloned so training never mutates the caller's saved state in place.
    """
    current = optimizer.state_dict()
    current["state"] = {
        k: {n: v.clone() if isinstance(v, Tensor) else v for n, v in s.items()}
        for k, s in saved["state"].items()
    }
    optimizer.load_state_dict(current)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, *, batch_size: int = 1024, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (in [0, 1]) of ``model`` on ``data``.

    Why: the server's test metric each round. Runs in eval mode without gradients and restores
    every submodule's previous train/eval mode afterwards; one host sync at the end.
    """
    if len(data) == 0:
        raise ValueError("evaluate: empty data")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for start in range(0, len(data), batch_size):
            xb = data.x[start : start + batch_size].to(device)
            yb = data.y[start : start + batch_size].to(device)
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    finally:
        for m, mode in modes:
            m.training = mode
    n = len(data)
    return float(loss) / n, float(correct) / n


def get_device(preference: str = "auto") -> torch.device:
    """The torch device for ``preference``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

    Why: device choice happens once, explicitly, never at import time.

    Raises:
        ValueError: unknown preference, or CUDA requested but unavailable / index out of range.
    """
    pref = preference.strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {preference!r} requested but CUDA is not available on this machine "
                "(use device=auto or device=cpu)"
            )
        dev = torch.device(pref)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return dev
    raise ValueError(f"unknown device {preference!r}; valid: auto, cpu, cuda, cuda:N")
