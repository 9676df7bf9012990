"""Counts taken as a fraction of a whole: ⌊β·n⌋ and ⌈β·d⌉ of the decimal fraction.

The product is rounded to 9 decimals before the floor or ceiling: in floating point
0.29 · 100 = 28.999999999999996 (⌊·⌋ would give 28, not 29) and 0.07 · 100 = 7.000000000000001
(⌈·⌉ would give 8, not 7). Every count of this kind in fedbgmd goes through these functions.
"""

from __future__ import annotations

import math

__all__ = ["block_size", "fraction_ceil", "fraction_floor"]


def fraction_floor(fraction: float, n: int) -> int:
    """⌊fraction · n⌋ (Byzantine clients, CTM's and NC_β's trimmed rows)."""
    return math.floor(round(fraction * n, 9))


def fraction_ceil(fraction: float, n: int) -> int:
    """⌈fraction · n⌉."""
    return math.ceil(round(fraction * n, 9))


def block_size(beta: float, d: int) -> int:
    """BGMD's block size k = ⌈β·d⌉, at least 1 and at most d."""
    return max(1, min(int(d), fraction_ceil(beta, d)))
