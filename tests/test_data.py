"""Tests of fedbgmd.data: synthetic task, real-data loading and its errors (partitions:
tests/test_partitions.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from fedbgmd import data
from fedbgmd.data import (
    DEBIAN_FASHION_MNIST_DIR,
    DatasetMissingError,
    TensorData,
    load_dataset,
    make_synthetic,
)

# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_seed() -> None:
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    c = make_synthetic(seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_synthetic_shapes_and_dtypes() -> None:
    ds = make_synthetic(num_train=100, num_test=30, num_features=8, num_classes=3)
    assert ds.train.x.shape == (100, 8) and ds.test.x.shape == (30, 8)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.input_shape == (8,) and ds.num_classes == 3 and ds.name == "synthetic"
    assert 0 <= int(ds.train.y.min()) and int(ds.train.y.max()) < 3
    assert len(ds.train) == 100


def test_synthetic_image_shape() -> None:
    ds = make_synthetic(num_train=10, num_test=5, shape=(1, 8, 8))
    assert ds.train.x.shape == (10, 1, 8, 8) and ds.input_shape == (1, 8, 8)


def test_synthetic_bad_args() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(num_classes=1)
    with pytest.raises(ValueError, match="noise"):
        make_synthetic(noise=-1.0)


def test_load_dataset_synthetic_passes_kwargs() -> None:
    ds = load_dataset("synthetic", num_train=50, num_test=10, seed=1)
    assert len(ds.train) == 50 and torch.equal(ds.train.x, make_synthetic(50, 10, seed=1).train.x)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ValueError, match=r"fashion_mnist.*mnist.*cifar10.*synthetic"):
        load_dataset("imagenet")


def test_extra_kwargs_for_real_dataset_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train"):
        load_dataset("mnist", root=str(tmp_path), num_train=5)


def test_tensor_data_checks_lengths() -> None:
    with pytest.raises(ValueError, match="rows"):
        TensorData(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))
    td = TensorData(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0]))
    sub = td.subset(torch.tensor([2, 0]))
    assert torch.equal(sub.y, torch.tensor([0, 0])) and len(sub) == 2


# ----------------------------------------------------------------------------- real data


def _write_idx(path: Path, tensor: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, tensor.dim()])
    header += b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + tensor.to(torch.uint8).numpy().tobytes())


def test_idx_files_from_explicit_root(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(
            raw / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g)
        )
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (4, 1, 28, 28)
    assert torch.equal(ds.test.y, torch.arange(4))
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10


def test_missing_root_error_names_paths_and_package(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion_mnist", root=str(root))
    msg = str(info.value)
    assert str(root) in msg and str(root / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_default_locations_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "DEFAULT_ROOT", tmp_path / "cache")
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion_mnist")
    msg = str(info.value)
    assert (
        str(tmp_path / "debian") in msg and str(tmp_path / "cache" / "FashionMNIST" / "raw") in msg
    )


def test_missing_cifar10_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path))


def test_corrupt_idx_file_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="magic"):
        data._read_idx(bad)


_HAVE_FMNIST = (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.fmnist
@pytest.mark.skipif(
    not _HAVE_FMNIST,
    reason=f"Fashion-MNIST files absent from {DEBIAN_FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert int(ds.train.y.min()) == 0 and int(ds.train.y.max()) == 9
    assert torch.equal(ds.train.y.bincount(), torch.full((10,), 6000))
    assert abs(float(ds.train.x.mean())) < 0.01 and abs(float(ds.train.x.std()) - 1.0) < 0.01


def test_normalization_is_what_load_dataset_applies(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = torch.tensor([0, 255, 51]).repeat(2, 28 * 28 // 3 + 1)[:, : 28 * 28].view(2, 28, 28)
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", pixels)
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", torch.arange(2))
    ds = load_dataset("Fashion-MNIST", root=str(tmp_path))
    (mean,), (std,) = data.normalization("fashion-mnist")
    # pixel 0 -> (0 - mean) / std, pixel 255 -> (1 - mean) / std, pixel 51 -> (0.2 - mean) / std
    got = ds.train.x[0, 0, 0, :3]
    want = (torch.tensor([0.0, 1.0, 0.2]) - mean) / std
    assert torch.allclose(got, want, atol=1e-6)
    assert data.normalization("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    with pytest.raises(ValueError, match="no normalization"):
        data.normalization("synthetic")
    with pytest.raises(ValueError, match="valid names"):
        data.normalization("imagenet")
