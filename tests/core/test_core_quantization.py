"""Packed QSGD / sign quantization."""

from __future__ import annotations

import math

import pytest
import torch

from fedbgmd.core import dequantize, quantize


def _v(d: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qsgd_unbiased(bits: int) -> None:
    v = _v(32)
    g = torch.Generator().manual_seed(1)
    draws = 1200
    acc = torch.zeros(32, dtype=torch.float64)
    for _ in range(draws):
        acc += dequantize(quantize(v, bits=bits, generator=g)).double()
    mean = acc / draws
    # per-coordinate std of stochastic rounding is at most half a level, ||v|| / (2 s)
    se_max = float(v.norm()) / (2 * (2 ** (bits - 1) - 1)) / math.sqrt(draws)
    assert float((mean - v.double()).abs().max()) <= 5 * se_max
    # a deterministic (biased) nearest rounding would fail this on some coordinate
    nearest = torch.round(v.double().abs() / v.double().norm() * (2 ** (bits - 1) - 1))
    biased = nearest * v.double().norm() / (2 ** (bits - 1) - 1) * torch.sign(v.double())
    assert float((biased - v.double()).abs().max()) > 5 * se_max


def test_sixteen_bits_close() -> None:
    v = _v(1000, 2)
    q = dequantize(quantize(v, bits=16, generator=torch.Generator().manual_seed(0)))
    assert float((q - v).abs().max()) <= 1e-4 * float(v.norm())


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_shapes_and_packed_bytes(bits: int) -> None:
    v = torch.randn(3, 5, 7)
    q = quantize(v, bits=bits, generator=torch.Generator().manual_seed(0))
    assert q.data.dtype == torch.uint8
    assert q.nbytes == math.ceil(v.numel() * bits / 8) + 4
    out = dequantize(q)
    assert out.shape == v.shape and out.dtype == torch.float32
    if bits >= 2:
        assert float((out - v).abs().max()) <= float(v.norm()) / (2 ** (bits - 1) - 1) + 1e-6
    assert torch.equal(torch.sign(out[out != 0]), torch.sign(v[out != 0]))


def test_sign_quantization() -> None:
    v = torch.tensor([1.0, -2.0, 0.0, 3.0])
    out = dequantize(quantize(v, bits=1, method="sign"))
    torch.testing.assert_close(out, torch.tensor([1.5, -1.5, 1.5, 1.5]))
    assert quantize(torch.randn(100), bits=1, method="sign").nbytes == 13 + 4


def test_zero_vector_and_validation() -> None:
    for bits in (1, 4, 8, 16):
        assert bool((dequantize(quantize(torch.zeros(9), bits=bits)) == 0).all())
    for bad in (0, 17):
        with pytest.raises(ValueError):
            quantize(torch.ones(3), bits=bad)
    with pytest.raises(ValueError):
        quantize(torch.ones(3), bits=4, method="sign")
    with pytest.raises(ValueError):
        quantize(torch.ones(3), method="ternary")
    with pytest.raises(ValueError):
        quantize(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16])
def test_unpack_is_the_inverse_of_pack_across_chunks(bits: int) -> None:
    # the server unpacks in chunks of 65,536 codes (bounded memory for hostile messages)
    from fedbgmd.core.quantization import _UNPACK_CHUNK, _pack, _unpack

    g = torch.Generator().manual_seed(bits)
    for numel in (1, 9, _UNPACK_CHUNK, 2 * _UNPACK_CHUNK + 5):
        codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.int32)
        assert torch.equal(_unpack(_pack(codes, bits), bits, numel), codes)


# ----------------------------------------------------------------------------- buckets (QSGD)
def _exact_error(v: torch.Tensor, bits: int, b: int | None) -> float:
    return sum(_exact_variances(v, bits, b))


def _exact_variances(v: torch.Tensor, bits: int, b: int | None) -> list[float]:
    """E||Q(v) − v||² from the definition (Alistarh et al. 2017): coordinate j of a bucket of
    norm N is N/s · (⌊r⌋ or ⌊r⌋+1) with r = s|v_j|/N, so its variance is (N/s)² p(1 − p),
    p = r − ⌊r⌋. Written as a loop over buckets, independent of the implementation."""
    s = 2 ** (bits - 1) - 1
    vals = v.double().tolist()
    size = len(vals) if b is None else b
    out = []
    for start in range(0, len(vals), size):
        bucket = vals[start : start + size]
        norm = math.sqrt(sum(x * x for x in bucket))
        for x in bucket:
            r = s * abs(x) / norm if norm > 0 else 0.0
            p = r - math.floor(r)
            out.append((norm / s) ** 2 * p * (1 - p))
    return out


@pytest.mark.parametrize("bits, b", [(2, 16), (4, 64), (8, 100), (4, None)])
def test_bucketed_qsgd_is_unbiased_with_the_papers_variance(bits: int, b: int | None) -> None:
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(1000, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 1000)
    s = 2 ** (bits - 1) - 1
    trials = 2000
    qs = torch.stack(
        [dequantize(quantize(v, bits, "qsgd", g, bucket_size=b)).double() for _ in range(trials)]
    )
    exact = _exact_error(v, bits, b)
    bound = min((b or 1000) / s**2, math.sqrt(b or 1000) / s) * float(v.square().sum())
    assert exact <= bound
    measured = float((qs - v).square().sum(dim=1).mean())
    assert measured == pytest.approx(exact, rel=0.1)
    # unbiased: each coordinate's mean within 6 standard errors (float32 scales: + 1e-6 |v|)
    var = torch.tensor(_exact_variances(v, bits, b), dtype=torch.float64)
    assert bool(((qs.mean(dim=0) - v).abs() <= 6 * (var / trials).sqrt() + 1e-6 * v.abs()).all())


def test_buckets_cut_the_error_of_a_large_update() -> None:
    # one norm for 10^5 coordinates: E||Q(v) − v||²/||v||² ≈ √d/s-sized; 512-buckets: far less
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one, bucketed = _exact_error(v, 4, None), _exact_error(v, 4, 512)
    norm2 = float(v.square().sum())
    assert one / norm2 > 10 and bucketed / norm2 < 3
    q = quantize(v, 4, "qsgd", torch.Generator().manual_seed(1), bucket_size=512)
    assert float((dequantize(q).double() - v).square().sum()) / norm2 < 3


@pytest.mark.parametrize("d, bits, b", [(1000, 4, 128), (1001, 3, 512), (7, 8, 100), (10, 2, 1)])
def test_bucketed_packed_size(d: int, bits: int, b: int) -> None:
    v = torch.randn(d, generator=torch.Generator().manual_seed(d))
    q = quantize(v, bits, "qsgd", torch.Generator().manual_seed(0), bucket_size=b)
    n_buckets = -(-d // b)
    assert q.scale.shape == (n_buckets,) and q.scale.dtype == torch.float32
    assert q.nbytes == -(-d * bits // 8) + 4 * n_buckets
    # each scale is its bucket's norm
    for i in range(n_buckets):
        want = float(v[i * b : (i + 1) * b].double().norm())
        assert float(q.scale[i]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="bucket_size"):
        quantize(v, bits, "qsgd", bucket_size=0)
