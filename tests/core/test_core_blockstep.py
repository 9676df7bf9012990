"""BlockStep and ServerOptimizer: the stateful objects of the server step, and their checkpoints."""

from __future__ import annotations

import pytest
import torch

from fedbgmd.core import BlockStep, ServerOptimizer, bgmd_step, get_aggregator, make_memory


def _x(rnd: int) -> torch.Tensor:
    return torch.randn(5, 30, generator=torch.Generator().manual_seed(rnd))


def _gen(rnd: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + rnd)


@pytest.mark.parametrize("memory", ["per_client", "mean", "none"])
def test_block_step_is_bgmd_step_with_its_memory_and_generator(memory: str) -> None:
    gm = get_aggregator("gm")
    step = BlockStep(gm, beta=0.2, memory=memory, generator_for=_gen)
    mem = make_memory(memory, dim=30)
    for rnd in (1, 2, 3):
        ids = [0, 1, 2, 3, 4] if rnd != 2 else [5, 1, 2, 3, 0]
        got = step(_x(rnd), ids, rnd, step_size=0.5)
        want = bgmd_step(_x(rnd), gm, 6, mem, ids, step_size=0.5, generator=_gen(rnd))
        assert step.k(30) == 6  # ⌈0.2 · 30⌉
        assert torch.equal(got.vector, want.vector) and torch.equal(got.selected, want.selected)


def test_a_restored_block_step_continues_bitwise() -> None:
    gm = get_aggregator("gm")
    a = BlockStep(gm, beta=0.1, generator_for=_gen)
    a(_x(1), range(5), 1)
    b = BlockStep(gm, beta=0.1, generator_for=_gen)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(_x(2), range(5), 2).vector, b(_x(2), range(5), 2).vector)
    assert BlockStep(gm).state_dict() == {"memory": None}  # nothing before the first round


def test_a_stateful_aggregator_is_refused_by_the_block_step() -> None:
    with pytest.raises(ValueError, match="keeps state"):
        BlockStep(get_aggregator("cclip", center="previous"))


def test_server_optimizer_steps_and_restores_its_momentum() -> None:
    u1, u2 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    x1 = opt.step(torch.zeros(2), u1)
    torch.testing.assert_close(x1, -u1)  # b_1 = u_1
    twin = ServerOptimizer(lr=1.0, momentum=0.5)
    twin.load_state_dict(opt.state_dict())
    x2 = opt.step(x1, u2)
    torch.testing.assert_close(x2, x1 - (0.5 * u1 + u2))  # b_2 = μ b_1 + u_2
    assert torch.equal(twin.step(x1, u2), x2)
    nesterov = ServerOptimizer(momentum=0.5, nesterov=True)
    nesterov.step(torch.zeros(2), u1)
    torch.testing.assert_close(nesterov.step(torch.zeros(2), u2), -(u2 + 0.5 * (0.5 * u1 + u2)))
    with pytest.raises(ValueError, match="step size"):
        ServerOptimizer(lr=float("nan"))
