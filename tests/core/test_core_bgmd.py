"""Block selection, residual memory and the FL-BGMD step."""

from __future__ import annotations

import math

import pytest
import torch

from fedbgmd.core import (
    MeanMemory,
    PerClientMemory,
    available_aggregators,
    bgmd_step,
    geometric_median,
    get_aggregator,
    make_memory,
    select_block,
)


def _x(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", available_aggregators())
def test_full_block_no_memory_equals_aggregator(name: str) -> None:
    agg = get_aggregator(name)
    x = _x(max(9, agg.min_rows()), 20, 0)
    res = bgmd_step(x, agg, k=20, memory=make_memory("none", dim=20), client_ids=range(x.shape[0]))
    assert torch.equal(res.vector, agg(x).vector)
    assert res.relative_residual == 0.0 and res.memory_norm == 0.0


@pytest.mark.parametrize("kind", ["per_client", "mean"])
def test_full_block_memory_leaves_zero_residual(kind: str) -> None:
    mem = make_memory(kind, dim=12)
    gm = get_aggregator("gm")
    for r in range(3):
        res = bgmd_step(_x(6, 12, r), gm, k=12, memory=mem, client_ids=range(6))
        assert res.relative_residual == 0.0 and res.memory_norm == 0.0
    torch.testing.assert_close(res.vector, gm(_x(6, 12, 2)).vector)


def test_lemma1_sampling_and_topk() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 200, generator=g) * torch.rand(200, generator=g) ** 3
    total = float(x.square().sum())
    for k in (10, 50, 150):
        res = []
        for _ in range(200):
            idx = select_block(x, k, method="sample", generator=g)
            res.append(1.0 - float(x[:, idx].square().sum()) / total)
        assert sum(res) / len(res) <= 1.0 - k / 200 + 0.01
        idx = select_block(x, k, method="topk")
        top = 1.0 - float(x[:, idx].square().sum()) / total
        assert top <= 1.0 - k / 200 and top <= min(res) + 1e-6
        assert torch.equal(select_block(x, k, method="topk"), idx)


def test_sampling_probabilities_follow_column_norms() -> None:
    # k = 1: P(j) = s_j / sum(s); compare frequencies over many draws
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = s.sqrt()[None, :]
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        counts[select_block(x, 1, method="sample", generator=g)] += 1
    freq = counts / draws
    assert torch.allclose(freq, s / s.sum(), atol=0.03)


def test_sampling_zero_columns_filled() -> None:
    x = torch.zeros(3, 10)
    x[:, 2] = 1.0
    x[:, 7] = 2.0
    g = torch.Generator().manual_seed(2)
    idx = select_block(x, 5, method="sample", generator=g)
    assert {2, 7} <= set(idx.tolist()) and len(set(idx.tolist())) == 5
    assert select_block(torch.zeros(2, 6), 3, generator=g).unique().numel() == 3


def test_relative_residual_reported() -> None:
    x = _x(5, 30, 3)
    g = torch.Generator().manual_seed(4)
    res = bgmd_step(x, get_aggregator("gm"), 6, make_memory("none", 30), range(5), generator=g)
    kept = float(x[:, res.selected].square().sum())
    assert math.isclose(res.relative_residual, 1 - kept / float(x.square().sum()), rel_tol=1e-5)
    assert torch.equal(res.vector[res.selected], res.aggregation.vector)
    mask = torch.ones(30, dtype=torch.bool)
    mask[res.selected] = False
    assert bool((res.vector[mask] == 0).all())


def test_per_client_memory_partial_participation() -> None:
    mem = make_memory("per_client", dim=8)
    assert isinstance(mem, PerClientMemory)
    gm = get_aggregator("gm")
    g = torch.Generator().manual_seed(0)
    x1 = _x(3, 8, 1)
    res1 = bgmd_step(x1, gm, 3, mem, client_ids=[10, 11, 12], step_size=0.5, generator=g)
    r10, r11, r12 = (mem.residual(c) for c in (10, 11, 12))
    # new clients: M = 0, so each residual is 0.5 x with the block's columns zeroed
    # (the line here compared an expression with itself)
    first = 0.5 * x1
    first[:, res1.selected] = 0
    torch.testing.assert_close(torch.stack([r10, r11, r12]), first)
    x2 = _x(2, 8, 2)
    res = bgmd_step(x2, gm, 3, mem, client_ids=[12, 13], step_size=0.5, generator=g)
    assert torch.equal(mem.residual(10), r10) and torch.equal(mem.residual(11), r11)
    p = torch.stack([0.5 * x2[0] + r12, 0.5 * x2[1]])  # client 13 is new: zero memory
    expected = p.clone()
    expected[:, res.selected] = 0
    torch.testing.assert_close(mem.residual(12), expected[0])
    torch.testing.assert_close(mem.residual(13), expected[1])
    stored = torch.stack([mem.residual(c) for c in (10, 11, 12, 13)])
    assert math.isclose(mem.norm(), float(stored.double().norm()), rel_tol=1e-6)


def test_mean_memory_is_row_mean_of_residual() -> None:
    mem = make_memory("mean", dim=10)
    assert isinstance(mem, MeanMemory)
    x = _x(4, 10, 5)
    g = torch.Generator().manual_seed(0)
    res = bgmd_step(x, get_aggregator("mean"), 4, mem, range(4), step_size=2.0, generator=g)
    want = (2.0 * x).mean(0)
    want[res.selected] = 0
    torch.testing.assert_close(mem.m, want)
    res2 = bgmd_step(x, get_aggregator("mean"), 4, mem, range(4), step_size=2.0, generator=g)
    p = 2.0 * x + want
    torch.testing.assert_close(res2.vector[res2.selected], p[:, res2.selected].mean(0))


@pytest.mark.parametrize("kind", ["per_client", "mean", "none"])
def test_state_dict_round_trip_continues_identically(kind: str) -> None:
    gm = get_aggregator("gm")
    mem = make_memory(kind, dim=16)
    g = torch.Generator().manual_seed(0)
    for r in range(2):
        bgmd_step(_x(5, 16, r), gm, 4, mem, client_ids=[1, 2, 3, 4, 5], generator=g)
    state = mem.state_dict()
    rng = g.get_state()
    clone = make_memory(kind, dim=16)
    clone.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(rng)
    for r in range(2, 4):
        ids = [2, 3, 4, 6, 7] if kind == "per_client" else [1, 2, 3, 4, 5]
        a = bgmd_step(_x(5, 16, r), gm, 4, mem, client_ids=ids, generator=g)
        b = bgmd_step(_x(5, 16, r), gm, 4, clone, client_ids=ids, generator=g2)
        assert torch.equal(a.vector, b.vector) and torch.equal(a.selected, b.selected)
        assert a.memory_norm == b.memory_norm


def test_nonfinite_rows_leave_memory_untouched() -> None:
    mem = make_memory("per_client", dim=6)
    gm = get_aggregator("gm")
    bgmd_step(_x(3, 6, 0), gm, 2, mem, client_ids=[0, 1, 2], generator=torch.Generator())
    before = mem.residual(1)
    x = _x(3, 6, 1)
    x[1, 3] = float("nan")
    res = bgmd_step(x, gm, 2, mem, client_ids=[0, 1, 2], generator=torch.Generator())
    assert res.aggregation.n_dropped == 1 and bool(torch.isfinite(res.vector).all())
    assert torch.equal(mem.residual(1), before)


def test_breakdown_gm_and_bgmd_vs_mean() -> None:
    n, d = 20, 500
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    bad = math.floor(0.45 * n)
    honest = x[bad:]
    direction = torch.randn(d, generator=g)
    x[:bad] = honest.mean(0) + 1e6 * direction / direction.norm()
    ref = geometric_median(honest).median
    spread = float((honest - ref).norm(dim=1).median())
    gm = get_aggregator("gm")(x).vector
    assert float((gm - ref).norm()) < 10 * spread
    k = math.ceil(0.1 * d)
    res = bgmd_step(x, get_aggregator("gm"), k, make_memory("none", d), range(n), generator=g)
    block_ref = ref[res.selected]
    assert float((res.aggregation.vector - block_ref).norm()) < 10 * spread
    assert float((get_aggregator("mean")(x).vector - ref).norm()) > 1e4


def test_bgmd_validation() -> None:
    mem = make_memory("none", dim=4)
    with pytest.raises(ValueError):
        bgmd_step(torch.randn(2, 4), get_aggregator("gm"), 5, mem, [0, 1])
    with pytest.raises(ValueError):
        bgmd_step(torch.randn(2, 4), get_aggregator("gm"), 2, mem, [0])
    with pytest.raises(ValueError):
        make_memory("per_row", dim=3)
    with pytest.raises(ValueError):
        make_memory("per_client", dim=3).combine(torch.randn(2, 3), 1.0, [1, 1])


def test_block_step_passes_the_client_weights_to_the_aggregator() -> None:
    x = torch.tensor([[0.0, 0.0], [10.0, 10.0], [float("nan"), 1.0]])
    w = torch.tensor([1.0, 3.0, 5.0])
    mean = get_aggregator("mean")
    res = bgmd_step(
        x, mean, k=2, memory=make_memory("none", dim=2), client_ids=[0, 1, 2], weights=w
    )
    # the NaN row and its weight are dropped; weighted mean of the rest (was: unweighted 5.0)
    torch.testing.assert_close(res.vector, torch.tensor([7.5, 7.5]))
    torch.testing.assert_close(res.vector, mean(x[:2], w[:2]).vector)
    with pytest.raises(ValueError, match="weights must have shape"):
        bgmd_step(
            x, mean, k=2, memory=make_memory("none", dim=2), client_ids=[0, 1, 2], weights=w[:2]
        )


@pytest.mark.parametrize("kind", ["per_client", "mean"])
def test_a_refused_block_stays_in_the_memory(kind: str) -> None:
    # Krum with f = 2 needs more than 5 rows: the round is refused, nothing is applied, and the
    # round's P_t = M_t + G_t must stay in the memory (it was: M_{t+1} = P_t - C_k(P_t), the
    # block's mass lost).
    x = _x(5, 40, 3)
    mem = make_memory(kind, dim=40)
    with pytest.raises(ValueError):
        bgmd_step(x, get_aggregator("krum", f=2), k=8, memory=mem, client_ids=range(5))
    if kind == "per_client":
        assert isinstance(mem, PerClientMemory)
        for i in range(5):
            torch.testing.assert_close(mem.residual(i), x[i])
    else:
        assert isinstance(mem, MeanMemory)
        torch.testing.assert_close(mem.m, x.mean(0))
    torch.testing.assert_close(
        mem.norm(), float(x.norm() if kind == "per_client" else x.mean(0).norm())
    )


def test_float32_overflowing_rows_keep_selection_and_diagnostics_meaningful() -> None:
    # finite rows at 1e20 (their squares overflow float32): the column norms used to be inf, so
    # the sampling ignored its generator, and the relative residual and memory norm were NaN
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5000, generator=g) * 0.01
    x[:3] = 1e20
    sels = []
    for seed in (0, 1):
        r = bgmd_step(
            x,
            get_aggregator("gm"),
            k=500,
            memory=make_memory("per_client", dim=5000),
            client_ids=range(10),
            generator=torch.Generator().manual_seed(seed),
        )
        assert 0.0 <= r.relative_residual <= 1.0 and math.isfinite(r.memory_norm)
        assert r.aggregation.converged
        # GM of the block ignores the 3 far rows: the update is on the honest scale
        assert float(r.vector.abs().max()) < 0.1
        sels.append(r.selected)
    assert not torch.equal(sels[0], sels[1])


def _snapshot(mem) -> tuple[dict, float]:
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in mem.state_dict().items()}, (
        mem.norm()
    )


def _same(a: tuple[dict, float], b: tuple[dict, float]) -> bool:
    (sa, na), (sb, nb) = a, b
    if sa.keys() != sb.keys() or na != nb:
        return False
    return all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


class _Broken(Exception):
    pass


def _raising_aggregator(x, weights=None):
    raise _Broken("not a refusal: a failing aggregator")


@pytest.mark.parametrize("kind", ["per_client", "mean", "none"])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [1, 2, 3, 4]])
@pytest.mark.parametrize("failure", ["selector", "aggregator", "all_overflow"])
def test_a_step_that_raises_leaves_the_memory_bitwise_unchanged(
    kind: str, order: list[int], failure: str
) -> None:
    # issue 18: combine wrote P = γG + M into the stored rows when the present clients' rows
    # were contiguous (ids [0,1,2,3]), so a step raising before commit left P in the memory and
    # the cached norm stale; [3,1,0,2] (a copy) changed nothing. Id 4 is new to the memory.
    from fedbgmd.core import SELECTORS

    if "wrong_shape" not in SELECTORS.names():
        SELECTORS.register("wrong_shape", lambda s, k, g: torch.arange(k + 1))
    mem = make_memory(kind, dim=12)
    gm = get_aggregator("gm")
    bgmd_step(_x(4, 12, 0), gm, 3, mem, [0, 1, 2, 3], generator=torch.Generator().manual_seed(0))
    before = _snapshot(mem)
    x = _x(4, 12, 1)
    selector, agg = "sample", gm
    if failure == "selector":
        selector = "wrong_shape"
    elif failure == "aggregator":
        agg = _raising_aggregator
    else:
        x = torch.full((4, 12), 3e38)  # finite messages; γG overflows every row
    with pytest.raises((ValueError, _Broken)):
        bgmd_step(x, agg, 3, mem, order, step_size=2.0, selector=selector)
    assert _same(_snapshot(mem), before)
    # the memory still works and its cached norm is the norm of what it stores
    bgmd_step(_x(4, 12, 2), gm, 3, mem, order, generator=torch.Generator().manual_seed(1))
    state = mem.state_dict()
    stored = state.get("rows", state.get("m", torch.zeros(1)))
    assert mem.norm() == pytest.approx(float(stored.double().norm()), rel=1e-6)
