"""Every aggregator against a slow float64 loop-based reference on random data."""

from __future__ import annotations

import math

import pytest
import torch

from fedbgmd.core import available_aggregators, get_aggregator

Rows = list[list[float]]


def _median(vals: list[float]) -> float:
    s = sorted(vals)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _cols(x: Rows) -> list[list[float]]:
    return [list(c) for c in zip(*x)]


def _dist2(a: list[float], b: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b))


def _mean_rows(x: Rows) -> list[float]:
    return [sum(c) / len(c) for c in _cols(x)]


def ref_mean(x: Rows) -> list[float]:
    return _mean_rows(x)


def ref_cm(x: Rows) -> list[float]:
    return [_median(c) for c in _cols(x)]


def ref_ctm(x: Rows, beta: float = 0.1) -> list[float]:
    b = math.floor(beta * len(x))
    return [sum(sorted(c)[b : len(c) - b]) / (len(c) - 2 * b) for c in _cols(x)]


def ref_gm(x: Rows) -> list[float]:
    y = _mean_rows(x)
    for _ in range(20000):
        w = [1.0 / max(math.sqrt(_dist2(r, y)), 1e-12) for r in x]
        new = [sum(wi * r[j] for wi, r in zip(w, x)) / sum(w) for j in range(len(y))]
        if _dist2(new, y) < 1e-26:
            return new
        y = new
    return y


def _krum_scores(x: Rows, f: int) -> list[float]:
    n = len(x)
    q = min(max(n - f - 2, 1), n - 1)
    return [sum(sorted(_dist2(x[i], x[j]) for j in range(n) if j != i)[:q]) for i in range(n)]


def ref_krum(x: Rows, f: int = 0) -> list[float]:
    s = _krum_scores(x, f)
    return x[s.index(min(s))]


def ref_multikrum(x: Rows, f: int = 0) -> list[float]:
    s = _krum_scores(x, f)
    order = sorted(range(len(x)), key=lambda i: s[i])[: len(x) - f]
    return _mean_rows([x[i] for i in order])


def _bulyan_trim(sel: Rows, f: int) -> list[float]:
    beta = len(sel) - 2 * f
    out = []
    for c in _cols(sel):
        m = _median(c)
        out.append(sum(sorted(c, key=lambda v: abs(v - m))[:beta]) / beta)
    return out


def ref_bulyan(x: Rows, f: int = 1) -> list[float]:
    """El Mhamdi et al. 2018, Algorithm 1: θ = n − 2f times, Krum on the rows not chosen yet
    (recomputing the scores on them), then the trimmed aggregate around the median."""
    remaining, sel = list(x), []
    while len(sel) < len(x) - 2 * f:
        pick = ref_krum(remaining, f)
        sel.append(pick)
        remaining.remove(pick)
    return _bulyan_trim(sel, f)


def ref_bulyan_multikrum(x: Rows, f: int = 1) -> list[float]:
    n = len(x)
    s = _krum_scores(x, f)
    return _bulyan_trim([x[i] for i in sorted(range(n), key=lambda i: s[i])[: n - 2 * f]], f)


def _clip(z: list[float], tau: float) -> list[float]:
    nz = math.sqrt(sum(v * v for v in z))
    return z if nz <= tau else [v * tau / nz for v in z]


def ref_nc(x: Rows) -> list[float]:
    tau = _median([math.sqrt(sum(v * v for v in r)) for r in x])
    return _mean_rows([_clip(r, tau) for r in x])


def ref_norm_filter(x: Rows, beta: float = 0.2) -> list[float]:
    """NC_β (the seed's Table 1): drop the ⌊β·n⌋ rows of largest norm, average the rest."""
    from fractions import Fraction

    b = math.floor(Fraction(str(beta)) * len(x))
    by_norm = sorted(x, key=lambda r: sum(v * v for v in r))
    return _mean_rows(by_norm[: len(x) - b])


def ref_cclip_history(calls: list[Rows], tau: float, iterations: int) -> list[list[float]]:
    """Karimireddy et al. 2021: each round starts from the previous round's output (0 first)."""
    v, out = [0.0] * len(calls[0][0]), []
    for x in calls:
        for _ in range(iterations):
            c = _mean_rows([_clip([a - b for a, b in zip(r, v)], tau) for r in x])
            v = [a + b for a, b in zip(v, c)]
        out.append(v)
    return out


def ref_cclip(x: Rows, tau: float = 1.0, iterations: int = 3) -> list[float]:
    v = ref_cm(x)
    for _ in range(iterations):
        c = _mean_rows([_clip([a - b for a, b in zip(r, v)], tau) for r in x])
        v = [a + b for a, b in zip(v, c)]
    return v


CASES = {
    "mean": ({}, ref_mean),
    "cm": ({}, ref_cm),
    "ctm": ({"trim": 0.2}, lambda x: ref_ctm(x, 0.2)),
    "gm": ({"eps": 1e-12}, ref_gm),
    "krum": ({"f": 2}, lambda x: ref_krum(x, 2)),
    "multikrum": ({"f": 2}, lambda x: ref_multikrum(x, 2)),
    "bulyan": ({"f": 2}, lambda x: ref_bulyan(x, 2)),
    "bulyan_multikrum": ({"f": 2}, lambda x: ref_bulyan_multikrum(x, 2)),
    "nc": ({}, ref_nc),
    "norm_filter": ({"trim": 0.2}, ref_norm_filter),
    "cclip": ({"tau": 1.0, "iterations": 3}, ref_cclip),
}


def test_every_builtin_has_a_reference() -> None:
    builtin = {"mean", "cm", "ctm", "gm", "krum", "multikrum", "bulyan", "nc", "cclip"}
    builtin |= {"bulyan_multikrum", "norm_filter"}
    assert builtin <= set(available_aggregators())
    assert builtin == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("n", [11, 12])
def test_against_reference(name: str, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x[:2] += 8.0  # a couple of outliers
    params, ref = CASES[name]
    got = get_aggregator(name, **params)(x).vector
    want = torch.tensor(ref(x.tolist()), dtype=torch.float64)
    tol = 1e-6 if name == "gm" else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_bulyan_is_recursive_krum_not_one_shot_multikrum() -> None:
    """A case where the two selections differ: a tight honest cluster and two near-identical
    far rows. One-shot scores favour the pair (each is the other's near neighbour); once Krum
    has taken one of them, the other has no close neighbour left and recursion skips it."""
    f = 1
    x = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [0.05, 0.05]]
    x += [[3.0, 3.0], [3.0, 3.01]]  # n = 7 = 4f + 3
    got = get_aggregator("bulyan", f=f)(torch.tensor(x, dtype=torch.float64)).vector
    want = ref_bulyan(x, f)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert want != ref_bulyan_multikrum(x, f)  # the case discriminates the two rules


@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("extra", [0, 3])
def test_bulyan_against_the_recursive_reference(f: int, extra: int) -> None:
    n = 4 * f + 3 + extra
    g = torch.Generator().manual_seed(10 * f + extra)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x[:f] += 4.0 * torch.randn(f, 5, generator=g, dtype=torch.float64)
    got = get_aggregator("bulyan", f=f)(x).vector
    torch.testing.assert_close(got, torch.tensor(ref_bulyan(x.tolist(), f), dtype=torch.float64))


@pytest.mark.parametrize("beta, n, dropped", [(0.29, 100, 29), (0.2, 10, 2), (0.0, 5, 0)])
def test_norm_filter_drops_the_decimal_floor_of_largest_norms(beta, n, dropped) -> None:
    # row i has norm i + 1: the `dropped` last rows go, whatever the row order
    x = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1) * torch.tensor([[0.6, 0.8]])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    res = get_aggregator("norm_filter", trim=beta)(x[perm])
    torch.testing.assert_close(res.vector, x[: n - dropped].mean(0))
    assert res.extra["dropped"] == dropped


def test_cclip_previous_is_centred_on_the_last_output() -> None:
    g = torch.Generator().manual_seed(7)
    calls = [torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.5 * t for t in range(4)]
    for x in calls:
        x[:2] += 20.0  # outliers every round
    agg = get_aggregator("cclip", tau=0.5, iterations=2, center="previous")
    assert agg.stateful
    got = [agg(x).vector for x in calls]
    want = ref_cclip_history([x.tolist() for x in calls], 0.5, 2)
    torch.testing.assert_close(torch.stack(got), torch.tensor(want, dtype=torch.float64))
    # state round trip: a fresh aggregator loaded with the state continues identically
    fresh = get_aggregator("cclip", tau=0.5, iterations=2, center="previous")
    first = get_aggregator("cclip", tau=0.5, iterations=2, center="previous")
    first(calls[0])
    fresh.load_state_dict(first.state_dict())
    torch.testing.assert_close(fresh(calls[1]).vector, got[1])
    # probe() evaluates without moving the state
    probe = agg.probe()
    probe(calls[0])
    torch.testing.assert_close(agg.state_dict()["previous"], got[-1])


def test_weighted_mean_and_gm_equal_duplication() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])
    dup = x.repeat_interleave(w.long(), dim=0)
    for name, tol in (("mean", 1e-12), ("gm", 1e-6)):
        kw = {"eps": 1e-12} if name == "gm" else {}
        agg = get_aggregator(name, **kw)
        torch.testing.assert_close(agg(x, weights=w).vector, agg(dup).vector, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 12, 31, 32])
def test_coordinate_median_is_the_kth_value_definition_bitwise(n: int, dtype: torch.dtype) -> None:
    """The CPU path (numpy's partition) gives exactly the kthvalue definition, ties included:
    odd n the (n//2+1)-th value, even n the mean of the n/2-th and (n/2+1)-th."""
    from fedbgmd.core.coordinatewise import coordinate_median

    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (n, 500), generator=g).to(dtype)  # many ties
    x[:, :250] += torch.randn(n, 250, generator=g).to(dtype)
    hi = torch.kthvalue(x, n // 2 + 1, dim=0).values
    want = hi if n % 2 else torch.kthvalue(x, n // 2, dim=0).values.add_(hi).mul_(0.5)
    x0 = x.clone()
    got = coordinate_median(x)
    assert torch.equal(x, x0)
    assert got.dtype == dtype and got.shape == (500,)
    assert torch.equal(got, want)
    # its own storage (not a view that keeps the partitioned (n, d) copy alive), input untouched
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
    assert torch.equal(coordinate_median(x.T.contiguous().T), want)  # a strided input
    assert torch.equal(coordinate_median(x.clone().requires_grad_(dtype != torch.bfloat16)), want)
