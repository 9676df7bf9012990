"""Aggregators against a maintained peer implementation, ByzFL (optional test dependency).

ByzFL is not a dependency of fedbgmd: install it to run these (``pip install byzfl``; its import
needs scipy, seaborn and pandas). Skipped with a message when it is absent.
"""

from __future__ import annotations

import pytest
import torch

from fedbgmd.core import get_aggregator

byzfl = pytest.importorskip(
    "byzfl", reason="ByzFL not installed (optional peer reference: pip install byzfl)"
)


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:2] += 6.0  # two outliers
    return x


def _close(got: torch.Tensor, want, tol: float = 1e-5) -> None:
    want = torch.as_tensor(want).to(torch.float64)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [11, 12])
def test_closed_forms_match_byzfl(n: int) -> None:
    x = _rows(n, 7, n)
    f = 2
    _close(get_aggregator("cm")(x).vector, byzfl.Median()(x.clone()))
    _close(get_aggregator("ctm", trim=f / n)(x).vector, byzfl.TrMean(f=f)(x.clone()))
    _close(get_aggregator("krum", f=f)(x).vector, byzfl.Krum(f=f)(x.clone()))
    _close(get_aggregator("multikrum", f=f)(x).vector, byzfl.MultiKrum(f=f)(x.clone()))
    _close(get_aggregator("mean")(x).vector, byzfl.Average()(x.clone()))


def test_geometric_median_matches_byzfl() -> None:
    x = _rows(11, 5, 3)
    want = byzfl.GeometricMedian(nu=1e-12, T=100000)(x.clone())
    _close(get_aggregator("gm", eps=1e-12)(x).vector, want, tol=1e-4)


def test_centred_clipping_with_history_matches_byzfl() -> None:
    ours = get_aggregator("cclip", tau=0.7, iterations=2, center="previous")
    theirs = byzfl.CenteredClipping(L=2, tau=0.7)
    for t in range(4):
        x = _rows(9, 6, 20 + t)
        _close(ours(x).vector, theirs(x.clone()))
