"""Data sets as in-memory tensors and client partitions (pure torch; no flwr, no hydra).

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

A real data set is never silently replaced by synthetic data: if the files are absent a
:class:`DatasetMissingError` lists every place looked in and how to get the data.

Example::

    >>> ds = load_dataset("synthetic", num_train=100, num_test=20)
    >>> parts = partition(ds.train.y, 4, "dirichlet", alpha=0.5, seed=1)
    >>> sum(len(p) for p in parts)
    100
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
    "DEBIAN_FASHION_MNIST_DIR",
    "DEFAULT_ROOT",
    "PARTITION_METHODS",
    "Dataset",
    "DatasetMissingError",
    "TensorData",
    "load_dataset",
    "make_synthetic",
    "partition",
]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "synthetic")
PARTITION_METHODS: tuple[str, ...] = ("iid", "dirichlet", "shards")

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


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------


def partition(
    labels: Tensor,
    num_partitions: int,
    method: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_size: int = 1,
    max_retries: int = 1000,
) -> list[Tensor]:
    """Split the indices ``0..N-1`` of ``labels`` into ``num_partitions`` disjoint index tensors.

    Why: iid and label-skewed (non-iid) client shares are the data side of every FL experiment.

    Methods (every index lands in exactly one part; each part sorted ascending, int64):

    * ``iid`` — a seeded random permutation cut into near-equal parts.
    * ``dirichlet`` — for each class ``c``, proportions ``p_c ~ Dir(α·1_P)`` split that class's
      shuffled indices among the parts (Hsu et al. 2019); resampled until every part holds at
      least ``min_size`` indices (at most ``max_retries`` tries). Small ``α`` → strong skew.
    * ``shards`` — indices sorted by label (random order within a class), cut into
      ``P·shards_per_client`` near-equal shards, shards dealt at random, ``shards_per_client``
      each (McMahan et al. 2017).

    Raises:
        ValueError: bad arguments (message says which and why), or Dirichlet resampling failed.
    """
    _check_partition_args(
        labels, num_partitions, method, alpha, shards_per_client, min_size, max_retries
    )
    g = torch.Generator().manual_seed(int(seed))
    y = labels.detach().to("cpu", torch.int64)
    if method == "iid":
        parts = list(torch.tensor_split(torch.randperm(len(y), generator=g), num_partitions))
    elif method == "shards":
        parts = _shards(y, num_partitions, shards_per_client, g)
    else:
        parts = _dirichlet(y, num_partitions, alpha, min_size, max_retries, g)
    return [torch.sort(p).values for p in parts]


def _check_partition_args(
    labels: Tensor,
    num_partitions: int,
    method: str,
    alpha: float,
    shards_per_client: int,
    min_size: int,
    max_retries: int,
) -> None:
    """Collect every argument error of :func:`partition` and raise once."""
    errors: list[str] = []
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        errors.append("labels must be a 1-D tensor")
    elif labels.is_floating_point() or labels.is_complex():
        errors.append(f"labels must be an integer tensor, got {labels.dtype}")
    elif len(labels) > 0 and int(labels.min()) < 0:
        errors.append("labels must be >= 0")
    n = len(labels) if isinstance(labels, Tensor) and labels.dim() == 1 else 0
    if method not in PARTITION_METHODS:
        errors.append(f"unknown method {method!r}; valid: {', '.join(PARTITION_METHODS)}")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        errors.append(f"num_partitions must be an int >= 1, got {num_partitions!r}")
    elif num_partitions * max(min_size, 1) > n:
        errors.append(
            f"{n} labels cannot fill {num_partitions} partitions with min_size={min_size}"
        )
    if min_size < 0:
        errors.append(f"min_size must be >= 0, got {min_size}")
    if method == "dirichlet" and not (alpha > 0 and math.isfinite(alpha)):
        errors.append(f"alpha must be finite and > 0, got {alpha}")
    if method == "dirichlet" and max_retries < 1:
        errors.append(f"max_retries must be >= 1, got {max_retries}")
    if method == "shards":
        if shards_per_client < 1:
            errors.append(f"shards_per_client must be >= 1, got {shards_per_client}")
        elif isinstance(num_partitions, int) and num_partitions * shards_per_client > n:
            errors.append(
                f"{num_partitions} partitions x {shards_per_client} shards exceed {n} labels"
            )
    if errors:
        raise ValueError("partition: " + "; ".join(errors))


def _shards(y: Tensor, parts: int, per_client: int, g: torch.Generator) -> list[Tensor]:
    """Label-sorted shards dealt ``per_client`` at a time."""
    perm = torch.randperm(len(y), generator=g)
    order = perm[torch.sort(y[perm], stable=True).indices]
    shards = torch.tensor_split(order, parts * per_client)
    deal = torch.randperm(parts * per_client, generator=g).view(parts, per_client)
    return [torch.cat([shards[int(s)] for s in row]) for row in deal]


def _dirichlet(
    y: Tensor, parts: int, alpha: float, min_size: int, max_retries: int, g: torch.Generator
) -> list[Tensor]:
    """Per-class Dirichlet proportions, resampled until every part has ``min_size`` indices."""
    classes = torch.unique(y)
    for _ in range(max_retries):
        buckets: list[list[Tensor]] = [[] for _ in range(parts)]
        for c in classes:
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            props = _sample_dirichlet(alpha, parts, g)
            cuts = torch.round(torch.cumsum(props, 0) * len(idx)).to(torch.int64)[:-1]
            for i, chunk in enumerate(torch.tensor_split(idx, cuts)):
                buckets[i].append(chunk)
        out = [torch.cat(b) for b in buckets]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"partition: Dirichlet(alpha={alpha}) left a partition with fewer than "
        f"min_size={min_size} indices in {max_retries} tries; raise alpha, lower min_size "
        "or use fewer partitions"
    )


def _sample_gamma(shape: float, n: int, g: torch.Generator) -> Tensor:
    """``n`` draws of Gamma(shape, 1) with an explicit generator (Marsaglia & Tsang 2000).

    Why: ``torch.distributions`` samplers cannot take a ``torch.Generator``.
    For ``shape < 1`` uses ``Gamma(a) = Gamma(a + 1) · U^{1/a}``.
    """
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64)
    filled = 0
    while filled < n:
        m = 2 * (n - filled) + 8
        z = torch.randn(m, generator=g, dtype=torch.float64)
        u = torch.rand(m, generator=g, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        acc = (d * v)[ok][: n - filled]
        out[filled : filled + len(acc)] = acc
        filled += len(acc)
    if boost:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        out = out * u.pow(1.0 / shape)
    return out


def _sample_dirichlet(alpha: float, k: int, g: torch.Generator) -> Tensor:
    """One draw of Dirichlet(alpha·1_k) as float64 proportions summing to 1."""
    gam = _sample_gamma(alpha, k, g).clamp_min(1e-300)
    return gam / gam.sum()
