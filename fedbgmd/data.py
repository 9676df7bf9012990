"""Data sets as in-memory tensors (torch; no flwr, no hydra). The clients' split of a data set is
:mod:`fedbgmd.partitions`.

Why: every simulated client slices one shared, already-normalised tensor, so loading happens once
and a round never touches the disk.

Data sets (``load_dataset``):

* ``fashion_mnist`` — the seed's main data set. Read straight from the standard idx(.gz) files,
  looked for (in order) in an explicit ``root``; else in Debian's package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) and torchvision's layout
  under :data:`DEFAULT_ROOT`. Downloaded by torchvision only when ``download=True``.
* ``mnist`` — same format (no Debian package exists); torchvision layout ``MNIST/raw``.
* ``cifar10`` — through ``torchvision.datasets.CIFAR10`` (python pickle batches).
* ``synthetic`` — :func:`make_synthetic`, a tiny learnable task for tests.
* ``hf`` — any Hugging Face data set through Flower Datasets' ``FederatedDataset``
  (:func:`load_hf_dataset`; the hub needs internet).

A real data set is never silently replaced by synthetic data: if the files are absent a
:class:`DatasetMissingError` lists every place looked in and how to get the data.

Example::

    >>> ds = load_dataset("synthetic", num_train=100, num_test=20)
    >>> len(ds.train), len(ds.test)
    (100, 20)
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DATASET_NAMES",
    "DATA_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DEFAULT_ROOT",
    "Dataset",
    "DatasetMissingError",
    "TensorData",
    "load_dataset",
    "load_hf_dataset",
    "make_synthetic",
]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "synthetic")
#: What ``data.name`` may be: a built-in data set, or ``hf`` (any Hugging Face data set, data.hf)
DATA_NAMES: tuple[str, ...] = (*DATASET_NAMES, "hf")

#: Where Debian's ``dataset-fashion-mnist`` package installs the idx files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Root used for torchvision's layout / downloads when ``root`` is not given
#: (environment variable ``FEDBGMD_DATA_ROOT`` overrides it).
DEFAULT_ROOT = Path(os.environ.get("FEDBGMD_DATA_ROOT", "~/.cache/fedbgmd/data")).expanduser()

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# name -> (torchvision class / folder name, mean, std)
_IDX_DATASETS = {
    "fashion_mnist": ("FashionMNIST", 0.2860, 0.3530),
    "mnist": ("MNIST", 0.1307, 0.3081),
}
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class TensorData:
    """Features and labels of one split, held in memory.

    Why: slicing a tensor by an index tensor is the cheapest way to give each client its share.

    Attributes:
        x: float32, ``N×C×H×W`` (images) or ``N×F`` (vectors), already normalised.
        y: int64 labels of shape ``(N,)`` in ``[0, num_classes)``.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorData: x has {self.x.shape[0]} rows but y has {self.y.shape[0]} labels"
            )
        if self.y.dim() != 1:
            raise ValueError(f"TensorData: y must be 1-D, got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Tensor) -> TensorData:
        """Rows ``indices`` (e.g. one client's partition); a copy, never a view."""
        return TensorData(self.x[indices], self.y[indices])

    def to(self, device: torch.device | str) -> TensorData:
        """The same split on ``device`` (no copy when already there)."""
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """A train/test pair plus what a model builder needs to know.

    Why: models are built from ``num_classes`` and ``input_shape`` so no size is hard-coded.
    """

    train: TensorData
    test: TensorData
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


class DatasetMissingError(FileNotFoundError):
    """The requested real data set is not on this machine.

    Why: a missing data set must stop the run with directions, never fall back to synthetic data.
    """


# --------------------------------------------------------------------------------------------
# idx files (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32}


def _read_idx(path: Path) -> Tensor:
    """Decode one idx(.gz) file (LeCun's format: magic, big-endian dims, raw data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = math.prod(dims)
    if dtype != torch.uint8:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported")
    if len(raw) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data, found {len(raw) - offset}")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=dtype).reshape(dims)


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files (plain or ``.gz``) in ``directory``, or ``None`` if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in _IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _idx_candidates(name: str, root: str | None) -> list[Path]:
    """Folders searched for the idx files, in order."""
    folder = _IDX_DATASETS[name][0]
    if root is not None:
        base = Path(root).expanduser()
        return [base, base / folder / "raw"]
    dirs = [DEBIAN_FASHION_MNIST_DIR] if name == "fashion_mnist" else []
    return [*dirs, DEFAULT_ROOT / folder / "raw"]


def _how_to_get(name: str) -> str:
    """The user-facing instructions for obtaining ``name``."""
    lines = []
    if name == "fashion_mnist":
        lines.append(
            "  * Debian/Ubuntu: `apt-get install dataset-fashion-mnist` "
            f"(installs the idx files under {DEBIAN_FASHION_MNIST_DIR})"
        )
    held = "cifar-10-batches-py" if name == "cifar10" else "the files"
    lines += [
        f"  * put {held} in a folder and pass data.root=<folder>",
        "  * or pass data.download=true on a machine with internet access (it downloads into "
        f"data.root, or {DEFAULT_ROOT} when data.root is not set; FEDBGMD_DATA_ROOT moves it)",
    ]
    return "\n".join(lines)


def _download(name: str, into: Path, looked: list[Path], fetch: Callable[[], object]) -> None:
    """Run torchvision's download ``fetch``; any failure (no internet: URLError; a proxy, a bad
    checksum) becomes a DatasetMissingError that names the data set, where it was looked for and
    downloaded to, and the other ways to get it."""
    try:
        fetch()
    except Exception as err:
        where = "\n".join(f"  - {d}" for d in looked)
        raise DatasetMissingError(
            f"{name}: not found and the download into {into} failed "
            f"({type(err).__name__}: {err}). Looked in:\n{where}\nTo get it:\n{_how_to_get(name)}"
        ) from err


def _load_idx_dataset(name: str, root: str | None, download: bool) -> Dataset:
    """Fashion-MNIST / MNIST from idx files, downloading through torchvision only if asked."""
    folder, mean, std = _IDX_DATASETS[name]
    candidates = _idx_candidates(name, root)
    files = next((f for f in map(_find_idx_files, candidates) if f is not None), None)
    if files is None:
        if not download:
            looked = "\n".join(f"  - {d}" for d in candidates)
            raise DatasetMissingError(
                f"{name}: the idx files ({', '.join(_IDX_FILES.values())}, optionally .gz) "
                f"were not found. Looked in:\n{looked}\nTo get them:\n{_how_to_get(name)}"
            )
        download_root = Path(root).expanduser() if root is not None else DEFAULT_ROOT
        _download(
            name, download_root, candidates, lambda: _torchvision_download(folder, download_root)
        )
        files = _find_idx_files(download_root / folder / "raw")
        if files is None:
            raise DatasetMissingError(
                f"{name}: download into {download_root / folder / 'raw'} left files missing"
            )

    def images(path: Path) -> Tensor:
        x = _read_idx(path).to(torch.float32).div_(255.0)
        return x.sub_(mean).div_(std).unsqueeze(1)

    def labels(path: Path) -> Tensor:
        return _read_idx(path).to(torch.int64)

    train = TensorData(images(files["train_x"]), labels(files["train_y"]))
    test = TensorData(images(files["test_x"]), labels(files["test_y"]))
    return Dataset(train, test, num_classes=10, input_shape=(1, 28, 28), name=name)


def _torchvision_download(folder: str, root: Path) -> None:
    """Let torchvision fetch ``folder`` (``FashionMNIST`` / ``MNIST``) into ``root``."""
    import torchvision  # lazy: importing torchvision costs about a second

    cls = getattr(torchvision.datasets, folder)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def _load_cifar10(root: str | None, download: bool) -> Dataset:
    """CIFAR-10 through torchvision, normalised per channel, ``N×3×32×32``."""
    base = Path(root).expanduser() if root is not None else DEFAULT_ROOT
    batches = base / "cifar-10-batches-py"
    import torchvision  # lazy

    if not (batches / "data_batch_1").is_file():
        if not download:
            raise DatasetMissingError(
                f"cifar10: {batches} (torchvision's CIFAR-10 layout) was not found. Looked in:\n"
                f"  - {batches}\nTo get it:\n{_how_to_get('cifar10')}"
            )
        _download(
            "cifar10",
            base,
            [batches],
            lambda: torchvision.datasets.CIFAR10(root=str(base), train=True, download=True),
        )

    mean = torch.tensor(_CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR10_STD).view(1, 3, 1, 1)

    def split(train: bool) -> TensorData:
        ds = torchvision.datasets.CIFAR10(root=str(base), train=train, download=False)
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return TensorData(((x - mean) / std).contiguous(), torch.as_tensor(ds.targets))

    return Dataset(split(True), split(False), 10, (3, 32, 32), "cifar10")


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def make_synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    num_features: int = 32,
    num_classes: int = 4,
    noise: float = 1.5,
    seed: int = 0,
    shape: Sequence[int] | None = None,
) -> Dataset:
    """A learnable Gaussian-mixture classification task, deterministic for ``seed``.

    Why: tests and smoke runs need real learning signal without any download.

    Class ``c`` has mean ``μ_c ~ N(0, I_F)``; a sample is ``x = μ_y + noise·z``, ``z ~ N(0, I_F)``,
    ``y`` uniform over classes; features are then standardised with the train split's overall
    mean and std. With the defaults a linear model reaches > 90 % test accuracy.

    Args:
        shape: if given (e.g. ``(1, 16, 16)``), samples are reshaped to ``N×shape`` so image models
            can be exercised cheaply; ``num_features`` is then ``prod(shape)``.
    """
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"make_synthetic: shape must be positive sizes, got {shape}")
        num_features = math.prod(shape)
    errors = [
        f"{k} must be >= {lo}, got {v}"
        for k, v, lo in (
            ("num_train", num_train, 1),
            ("num_test", num_test, 1),
            ("num_features", num_features, 1),
            ("num_classes", num_classes, 2),
        )
        if v < lo
    ]
    if not (noise >= 0 and math.isfinite(noise)):
        errors.append(f"noise must be finite and >= 0, got {noise}")
    if errors:
        raise ValueError("make_synthetic: " + "; ".join(errors))
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, num_features, generator=g)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        return means[y] + noise * torch.randn(n, num_features, generator=g), y

    x_tr, y_tr = sample(num_train)
    x_te, y_te = sample(num_test)
    mu, sd = x_tr.mean(), x_tr.std().clamp_min(1e-12)
    out_shape = shape if shape is not None else (num_features,)
    train = TensorData(((x_tr - mu) / sd).reshape(num_train, *out_shape), y_tr)
    test = TensorData(((x_te - mu) / sd).reshape(num_test, *out_shape), y_te)
    return Dataset(train, test, num_classes, out_shape, "synthetic")


# --------------------------------------------------------------------------------------------
# Any Hugging Face data set, through Flower Datasets' FederatedDataset (data=hf)
# --------------------------------------------------------------------------------------------


def load_hf_dataset(
    dataset: str,
    subset: str | None = None,
    feature_key: str = "image",
    label_key: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    cache_dir: str | None = None,
) -> Dataset:
    """A Hugging Face data set loaded by ``flwr_datasets.FederatedDataset``, held as tensors.

    Why: any data set a Flower user loads with ``FederatedDataset(dataset=...)`` runs here too;
    it is then split among the clients like every other (:func:`partition`), so
    ``FederatedDataset`` is asked for whole splits, unshuffled (the seeded shuffle is the
    partition's).

    ``dataset`` is a hub name (``ylecun/mnist``; needs internet the first time, then datasets'
    cache) or a local folder of data files ``datasets.load_dataset`` reads (e.g.
    ``train.parquet`` and ``test.parquet``). Features: images (``H×W`` or ``H×W×C``) become
    ``N×C×H×W``, vectors ``N×F``; integer pixels are scaled by 1/255; every channel (vectors: all
    features) is standardised with the train split's mean and std. Labels must be integers
    (a ``ClassLabel`` gives ``num_classes``, else ``max + 1``).

    Raises:
        DatasetMissingError: it could not be loaded (offline, unknown name, missing split); the
            message says why and what to do.
        ValueError: a column missing or of a kind that is not images, vectors or int labels.
    """
    from flwr_datasets import FederatedDataset

    kwargs = {"cache_dir": str(Path(cache_dir).expanduser())} if cache_dir else {}
    fds = FederatedDataset(
        dataset=dataset, subset=subset, partitioners={train_split: 1}, shuffle=False, **kwargs
    )
    try:
        splits = [fds.load_split(s) for s in (train_split, test_split)]
    except Exception as err:  # offline (ConnectionError), unknown name, a missing split
        raise DatasetMissingError(
            f"data=hf: flwr_datasets.FederatedDataset could not load {dataset!r} "
            f"(subset {subset!r}, splits {train_split!r}/{test_split!r}): "
            f"{type(err).__name__}: {err}\nThe Hugging Face hub needs internet the first time "
            "(later runs read datasets' cache, also with HF_HUB_OFFLINE=1); without it, give a "
            "local folder of data files (train.parquet, test.parquet) as data.hf.dataset"
        ) from err
    for key in (feature_key, label_key):
        if key not in splits[0].column_names:
            raise ValueError(
                f"data=hf: {dataset!r} has no column {key!r} (columns: "
                f"{', '.join(splits[0].column_names)}); set data.hf.feature_key / label_key"
            )
    label_feature = splits[0].features[label_key]
    xs, ys = [], []
    for split in splits:
        batch = split.with_format("numpy", columns=[feature_key, label_key])[:]
        xs.append(torch.as_tensor(batch[feature_key]))
        ys.append(torch.as_tensor(batch[label_key]))
    if any(y.dim() != 1 or y.is_floating_point() for y in ys):
        raise ValueError(f"data=hf: column {label_key!r} must hold one integer label a sample")
    num_classes = getattr(label_feature, "num_classes", None) or int(max(y.max() for y in ys)) + 1
    x_tr, x_te = (_as_model_input(x, feature_key) for x in xs)
    if x_tr.dim() == 2:  # vectors: over all features, as make_synthetic does
        mean, std = x_tr.mean(), x_tr.std()
    else:  # images: per channel
        mean, std = x_tr.mean(dim=(0, 2, 3), keepdim=True), x_tr.std(dim=(0, 2, 3), keepdim=True)
    std = std.clamp_min(1e-12)
    train = TensorData((x_tr - mean) / std, ys[0].to(torch.int64))
    test = TensorData((x_te - mean) / std, ys[1].to(torch.int64))
    return Dataset(train, test, num_classes, tuple(x_tr.shape[1:]), f"hf:{dataset}")


def _as_model_input(x: Tensor, key: str) -> Tensor:
    """``N×H×W`` / ``N×H×W×C`` images → float ``N×C×H×W``; ``N×F`` vectors → float ``N×F``."""
    scale = 1 / 255 if not x.is_floating_point() and x.dtype != torch.bool else 1.0
    x = x.to(torch.float32) * scale
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1).contiguous()
    if x.dim() == 4 and x.shape[-1] in (1, 3, 4):
        return x.permute(0, 3, 1, 2).contiguous()
    raise ValueError(
        f"data=hf: column {key!r} gives samples of shape {tuple(x.shape[1:])}; expected images "
        "(H×W or H×W×C with C in 1, 3, 4) or feature vectors"
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key == "fashionmnist":
        key = "fashion_mnist"
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` that :func:`load_dataset` applies to pixels scaled to [0, 1].

    Why: attacks and checks that speak in pixel units (e.g. impulse noise to exactly 0 or 1)
    convert with ``(pixel - mean) / std``; one source instead of copied constants.

    Raises:
        ValueError: unknown ``name``, or ``"synthetic"`` (its features are not pixels).
    """
    key = _canonical_name(name)
    if key == "cifar10":
        return _CIFAR10_MEAN, _CIFAR10_STD
    if key == "synthetic":
        raise ValueError("the synthetic data set is not normalised pixels: it has no normalization")
    _, mean, std = _IDX_DATASETS[key]
    return (mean,), (std,)


def load_dataset(
    name: str, root: str | None = None, download: bool = False, **synthetic_kwargs: Any
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASET_NAMES`) as in-memory tensors.

    Why: one call the CLI, the clients and the tests share; never a silent synthetic fallback.

    Args:
        root: folder holding the files. Given explicitly, only it (and torchvision's layout under
            it, e.g. ``root/FashionMNIST/raw``) is searched; otherwise Fashion-MNIST is looked for
            in :data:`DEBIAN_FASHION_MNIST_DIR` and then under :data:`DEFAULT_ROOT`.
        download: let torchvision download the data when it is not found (needs internet).
        synthetic_kwargs: keyword arguments of :func:`make_synthetic`; only for ``"synthetic"``.

    Raises:
        ValueError: unknown ``name``, or ``synthetic_kwargs`` given for a real data set.
        DatasetMissingError: the files are absent (the message says where we looked and how to
            get them).
    """
    key = _canonical_name(name)
    if key == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if synthetic_kwargs:
        raise ValueError(
            f"dataset {name!r} takes no extra options, got {sorted(synthetic_kwargs)} "
            "(those are make_synthetic's)"
        )
    if key == "cifar10":
        return _load_cifar10(root, download)
    return _load_idx_dataset(key, root, download)
