"""Plug-in contract, parametrised over every registered aggregator and selector (DESIGN item 6)."""

from __future__ import annotations

import pytest
import torch

from fedbgmd.core import (
    available_aggregators,
    available_selectors,
    get_aggregator,
    select_block,
)

AGGREGATORS = available_aggregators()
SELECTORS = available_selectors()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def _rows(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype).to(device)


def _n(agg_name: str, n: int) -> int:
    return max(n, get_aggregator(agg_name).min_rows())


def test_builtin_names_present() -> None:
    expected = {"mean", "cm", "ctm", "gm", "krum", "multikrum", "bulyan", "nc", "cclip"}
    assert expected <= set(AGGREGATORS)
    assert {"sample", "topk", "uniform"} <= set(SELECTORS)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_dtype_device_no_mutation_no_alias(
    name: str, device: str, dtype: torch.dtype
) -> None:
    x = _rows(_n(name, 9), 13, dtype, device)
    before = x.clone()
    out = get_aggregator(name)(x)
    v = out.vector
    assert v.shape == (13,) and v.dtype == dtype and v.device == x.device
    assert torch.equal(x, before)
    assert v.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert bool(torch.isfinite(v).all())
    assert out.n_dropped == 0


@pytest.mark.parametrize("name", AGGREGATORS)
def test_permutation_invariance_and_determinism(name: str) -> None:
    x = _rows(_n(name, 11), 17, torch.float64, "cpu", seed=1)
    agg = get_aggregator(name)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    a, b = agg(x).vector, agg(x[perm]).vector
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert torch.equal(agg(x).vector, a)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_single_row_returns_it(name: str) -> None:
    agg = get_aggregator(name)
    if agg.min_rows() > 1:
        pytest.skip(f"{name} needs {agg.min_rows()} rows")
    x = _rows(1, 7, torch.float32, "cpu")
    torch.testing.assert_close(agg(x).vector, x[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_identical_rows_return_the_row(name: str) -> None:
    row = _rows(1, 7, torch.float64, "cpu", seed=5)
    x = row.repeat(_n(name, 6), 1)
    torch.testing.assert_close(get_aggregator(name)(x).vector, row[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_nonfinite_rows_dropped(name: str) -> None:
    clean = _rows(_n(name, 9), 10, torch.float64, "cpu", seed=2)
    x = torch.cat([clean[:3], torch.full((1, 10), float("nan")), clean[3:]])
    x = torch.cat([x, clean[:1] * 0 + float("inf")])
    x[2, 4] = float("-inf")  # a clean row made dirty in one coordinate
    agg = get_aggregator(name)
    keep = torch.cat([clean[:2], clean[3:]])
    if keep.shape[0] < agg.min_rows():
        keep = clean
        x = torch.cat([clean, torch.full((2, 10), float("nan"))])
    out = agg(x)
    assert bool(torch.isfinite(out.vector).all())
    assert out.n_dropped == x.shape[0] - keep.shape[0]
    torch.testing.assert_close(out.vector, agg(keep).vector, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_all_nonfinite_raises(name: str) -> None:
    with pytest.raises(ValueError):
        get_aggregator(name)(torch.full((4, 3), float("nan")))


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("device", DEVICES)
def test_selector_contract(name: str, device: str) -> None:
    g0 = torch.Generator().manual_seed(0)
    # integer-valued entries: column norms are exact whatever the row order
    x = torch.randint(-4, 5, (8, 50), generator=g0).to(torch.float64).to(device)
    before = x.clone()

    def run(inp: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(7)
        return select_block(inp, 12, method=name, generator=g)

    idx = run(x)
    assert idx.dtype == torch.int64 and idx.shape == (12,) and idx.device == x.device
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.unique(idx).numel() == 12
    assert 0 <= int(idx.min()) and int(idx.max()) < 50
    assert torch.equal(x, before)
    assert torch.equal(run(x), idx)
    assert torch.equal(run(x[torch.randperm(8, generator=g0).to(device)]), idx)
    assert torch.equal(select_block(x, 50, method=name), torch.arange(50, device=device))
