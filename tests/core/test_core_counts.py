"""⌊β·n⌋ and ⌈β·d⌉ of the decimal fraction, against exact fractions (issue 18)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from fedbgmd.core import block_size, fraction_ceil, fraction_floor, get_aggregator

BETAS = ["0.01", "0.07", "0.1", "0.14", "0.2", "0.29", "0.3", "0.33", "0.49", "0.57", "1"]


@pytest.mark.parametrize("beta", BETAS)
def test_counts_equal_the_exact_fraction(beta: str) -> None:
    for n in range(1, 301):
        exact = Fraction(beta) * n
        assert fraction_floor(float(beta), n) == exact.numerator // exact.denominator
        assert fraction_ceil(float(beta), n) == -(-exact.numerator // exact.denominator)
        assert block_size(float(beta), n) == max(1, min(n, fraction_ceil(float(beta), n)))


def test_ctm_trims_the_decimal_floor() -> None:
    # ⌊0.29 · 100⌋ = 29 rows cut from each end (the float product 28.999999999999996 gave 28):
    # with 29 huge rows on each side the trimmed mean is the middle rows' mean
    mid = torch.arange(42, dtype=torch.float64).unsqueeze(1)
    x = torch.cat([torch.full((29, 1), -1e6), mid, torch.full((29, 1), 1e6)])
    got = get_aggregator("ctm", trim=0.29)(x).vector
    torch.testing.assert_close(got, mid.mean(0))
