"""Finite extremes (a hostile client's 1e20 or FLT_MAX rows) stay finite through the
coordinate-wise rules and the block step's memory (issue 13, holes 3 and 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbgmd.core import bgmd_step, get_aggregator, make_memory

FLT_MAX = float(np.finfo(np.float32).max)


def _columns(*values: float, d: int = 6) -> torch.Tensor:
    return torch.tensor([[v] * d for v in values], dtype=torch.float32)


@pytest.mark.parametrize(
    "name, params, rows, reference",
    [
        # even n: the two middle values are both FLT_MAX; (lo + hi) * 0.5 was inf
        ("cm", {}, (FLT_MAX, FLT_MAX, FLT_MAX, 0.0), lambda a: np.median(a, axis=0)),
        ("cm", {}, (-FLT_MAX, -FLT_MAX, -FLT_MAX, 1.0), lambda a: np.median(a, axis=0)),
        # the trimmed mean of three FLT_MAX values summed to inf in float32
        ("ctm", {"trim": 0.2}, (FLT_MAX,) * 4 + (0.0,), lambda a: np.sort(a, 0)[1:4].mean(0)),
        ("ctm", {"trim": 0.0}, (FLT_MAX, FLT_MAX), lambda a: a.mean(0)),
    ],
)
def test_coordinatewise_rules_do_not_overflow_in_float32(name, params, rows, reference) -> None:
    x = _columns(*rows)
    out = get_aggregator(name, **params)(x).vector
    want = torch.from_numpy(reference(x.double().numpy()).astype(np.float32))
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out, want)


def test_the_median_midpoint_is_overflow_safe_on_the_kthvalue_path() -> None:
    # float16 takes torch.kthvalue (the CUDA path) on the CPU: 65504 is float16's largest value
    x = torch.tensor([[65504.0], [65504.0], [65504.0], [0.0]], dtype=torch.float16)
    assert float(get_aggregator("cm")(x).vector[0]) == 65504.0


def test_the_median_midpoint_is_the_rounded_mean_of_the_middle_values() -> None:
    # lo/2 + hi/2 equals (lo + hi)/2 rounded once wherever the sum does not overflow
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 10_000, generator=g) * torch.logspace(-30, 30, 10_000)
    s = torch.sort(x, dim=0).values
    want = ((s[3].double() + s[4].double()) / 2).float()
    assert torch.equal(get_aggregator("cm")(x).vector, want)


@pytest.mark.parametrize("kind", ["per_client", "mean"])
def test_the_memory_never_stores_an_overflowing_row(kind: str) -> None:
    # issue 13: a client sending FLT_MAX twice stored inf in its residual row (P = G + M was
    # never re-checked): memory_norm and relative_residual were NaN, then 0.0, and with mean
    # memory every later round was skipped
    g = torch.Generator().manual_seed(0)
    n, d, k = 6, 40, 4
    mem = make_memory(kind, dim=d)
    gm = get_aggregator("gm")
    for rnd in range(4):
        x = torch.randn(n, d, generator=g) * 0.1
        x[0] = FLT_MAX  # finite, accepted; twice in a row its P row overflows
        step = bgmd_step(x, gm, k, mem, list(range(n)), generator=g)
        assert bool(torch.isfinite(step.vector).all())
        assert np.isfinite(step.memory_norm) and np.isfinite(step.relative_residual)
        store = mem.state_dict()["rows" if kind == "per_client" else "m"]
        assert bool(torch.isfinite(store).all())
        if rnd % 2 == 1:  # the second FLT_MAX in a row: client 0's P row was inf
            assert step.overflowed == (0,) and step.aggregation.n_dropped == 1
    # the stored norm is the norm of what is stored (float64, no float32 overflow)
    store = mem.state_dict()["rows" if kind == "per_client" else "m"]
    want = float(torch.linalg.vector_norm(store.double()))
    assert mem.norm() == pytest.approx(want, rel=1e-6)
