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
