"""Registries and the non-finite helper of fedbgmd.core (its import boundary: tests/test_layers.py)."""

from __future__ import annotations

import pytest
import torch

import fedbgmd.core as core
from fedbgmd.core import (
    AggregationResult,
    Aggregator,
    aggregation,
    all_finite,
    drop_nonfinite_rows,
    get_aggregator,
    register_aggregator,
    register_selector,
    select_block,
)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="gm"):
        get_aggregator("no-such-rule")
    with pytest.raises(ValueError, match="topk"):
        select_block(torch.ones(2, 3), 1, method="nope")


def test_unknown_param_is_named() -> None:
    with pytest.raises(TypeError, match="epsilon"):
        get_aggregator("gm", epsilon=1e-3)


def test_invalid_params() -> None:
    with pytest.raises(ValueError):
        get_aggregator("ctm", trim=0.5)
    with pytest.raises(ValueError):
        get_aggregator("bulyan", f=2)(torch.randn(10, 3))
    with pytest.raises(ValueError, match="weights"):
        get_aggregator("cm")(torch.randn(3, 2), weights=torch.ones(3))


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("gm", lambda: get_aggregator("gm"))
    with pytest.raises(ValueError, match="already registered"):
        register_selector("topk", lambda s, k, g: torch.arange(k))


def test_user_plugin_registration() -> None:
    class First(Aggregator):
        name = "test_first_row"

        def _aggregate(self, x: torch.Tensor, weights: torch.Tensor | None) -> AggregationResult:
            return AggregationResult(x.min(dim=0).values)

    register_aggregator("test_first_row", First)
    try:
        assert "test_first_row" in core.available_aggregators()
        out = get_aggregator("test_first_row")(torch.tensor([[1.0, 5.0], [2.0, 3.0]]))
        assert out.vector.tolist() == [1.0, 3.0]
    finally:  # do not leak the plug-in into other test modules of the session
        aggregation.AGGREGATORS.unregister("test_first_row")
    assert "test_first_row" not in core.available_aggregators()


def test_drop_nonfinite_rows() -> None:
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3e38, 3e38], [1.0, float("inf")]])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    xf, wf, n = drop_nonfinite_rows(x, w)
    assert n == 2 and xf.shape == (2, 2) and wf is not None and wf.shape == (2,)
    assert torch.equal(xf[1], x[2])  # finite row whose sum overflows is kept
    xf2, _, n2 = drop_nonfinite_rows(x[:1])
    assert (n2 == 0 and xf2 is x[:1]) or torch.equal(xf2, x[:1])
    _, _, n3 = drop_nonfinite_rows(x[:1].repeat(2, 1), torch.tensor([1.0, float("nan")]))
    assert n3 == 1
    with pytest.raises(ValueError):
        drop_nonfinite_rows(x[1:2])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, -2.0, 3.0], True),
        ([3e38, 3e38, -1.0], True),  # finite entries whose float32 sum overflows to inf
        ([-3e38, -3e38], True),
        ([1.0, float("nan"), 2.0], False),
        ([float("inf"), 1.0], False),
        ([float("inf"), float("-inf")], False),  # the sum is NaN
        ([], True),
    ],
)
def test_all_finite_matches_the_elementwise_check(values: list[float], expected: bool) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite(t) is expected
    assert expected is bool(torch.isfinite(t).all())


def test_all_finite_each_is_all_finite_of_each() -> None:
    from fedbgmd.core import all_finite, all_finite_each

    ts = [
        torch.tensor([1.0, -2.0]),
        torch.tensor([3e38, 3e38, -1.0]),  # overflowing sum of finite values
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), float("-inf")]),
        torch.tensor([], dtype=torch.float32),
        torch.tensor([1e308, 1e308], dtype=torch.float64),
        torch.tensor([1.0, float("-inf")], dtype=torch.float64),
    ]
    assert (
        all_finite_each(ts)
        == [all_finite(t) for t in ts]
        == [
            True,
            True,
            False,
            False,
            True,
            True,
            False,
        ]
    )
    assert all_finite_each([]) == []
