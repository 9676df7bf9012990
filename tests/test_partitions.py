"""Client partitions through Flower Datasets' partitioners (fedbgmd.partitions.partition): each mapped
scheme against Flower Datasets' own result, coverage, iid unchanged, startup checks, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner
from hydra import compose, initialize_config_module

from fedbgmd.config import ConfigError, register_configs, validate
from fedbgmd.data import make_synthetic
from fedbgmd.partitions import partition, partitioner_problems

N, P = 1000, 7
PATHOLOGICAL = "flwr_datasets.partitioner.PathologicalPartitioner"


def _labels(n: int = N, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _flower(labels: torch.Tensor, partitioner: Partitioner, seed: int) -> list[torch.Tensor]:
    """Flower Datasets' own partition of the train split in the order fedbgmd hands it over
    (shuffled by torch.randperm under the seed, as FederatedDataset shuffles before it
    partitions), written with the library's API directly, as a Flower user would."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    partitioner.dataset = datasets.Dataset.from_dict(
        {"label": labels[order].tolist(), "row": order.tolist()}
    )
    return [
        torch.sort(torch.tensor(partitioner.load_partition(pid)["row"], dtype=torch.int64)).values
        for pid in range(partitioner.num_partitions)
    ]


@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("iid", {}, lambda seed: IidPartitioner(num_partitions=P)),
        (
            "dirichlet",
            {},  # fedbgmd's default alpha=0.5, Flower's other defaults
            lambda seed: DirichletPartitioner(P, "label", alpha=0.5, seed=seed),
        ),
        (
            "dirichlet",
            {"alpha": 0.3, "min_partition_size": 5, "self_balancing": True},
            lambda seed: DirichletPartitioner(
                P, "label", alpha=0.3, min_partition_size=5, self_balancing=True, seed=seed
            ),
        ),
        (
            "shards",
            {},  # fedbgmd's default num_shards_per_partition=2
            lambda seed: ShardPartitioner(P, "label", num_shards_per_partition=2, seed=seed),
        ),
        (
            "shards",
            {"num_shards_per_partition": 3, "keep_incomplete_shard": True},
            lambda seed: ShardPartitioner(
                P, "label", num_shards_per_partition=3, keep_incomplete_shard=True, seed=seed
            ),
        ),
    ],
)
@pytest.mark.parametrize("seed", [0, 5])
def test_each_mapped_scheme_is_flower_datasets_own_result(method, params, reference, seed):
    labels = _labels()
    ours = partition(labels, P, method, params=params, seed=seed)
    theirs = _flower(labels, reference(seed), seed)
    assert len(ours) == len(theirs) == P
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_partitioner_chosen_by_target_is_flower_datasets_own_result():
    labels = _labels()
    params = {"num_classes_per_partition": 2, "class_assignment_mode": "first-deterministic"}
    ours = partition(labels, P, target=PATHOLOGICAL, params=params, seed=3)
    theirs = _flower(labels, PathologicalPartitioner(P, "label", seed=3, **params), 3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(len(labels[p].unique()) == 2 for p in ours)


def test_iid_is_the_partition_fedbgmd_made_before_flower_datasets():
    # the published (iid) numbers stand only if iid did not move: the pre-Flower-Datasets rule,
    # a seeded torch permutation cut into near-equal runs, each sorted
    labels = _labels(1003)
    for seed in (0, 1, 42):
        g = torch.Generator().manual_seed(seed)
        old = [
            torch.sort(p).values for p in torch.tensor_split(torch.randperm(1003, generator=g), 10)
        ]
        new = partition(labels, 10, "iid", seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(old, new))
        assert sorted(len(p) for p in new) == [100] * 7 + [101] * 3


@pytest.mark.parametrize(
    ("method", "target", "params"),
    [
        ("iid", None, {}),
        ("dirichlet", None, {"alpha": 0.3}),
        ("dirichlet", None, {"alpha": 100.0, "self_balancing": True}),
        # every class used by exactly two partitions: nothing is left out
        (
            "iid",
            PATHOLOGICAL,
            {"num_classes_per_partition": 2, "class_assignment_mode": "deterministic"},
        ),
    ],
)
def test_every_sample_in_exactly_one_partition(method, target, params):
    labels = _labels()
    parts = partition(labels, 10, method, target=target, params=params, seed=5)
    joined = torch.cat(parts)
    assert joined.dtype == torch.int64 and len(parts) == 10 and min(len(p) for p in parts) >= 1
    assert torch.equal(torch.sort(joined).values, torch.arange(N))
    assert all(torch.equal(p, torch.sort(p).values) for p in parts)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_shards_leave_out_exactly_the_remainder_flower_drops(shards):
    # ShardPartitioner cuts shards of floor(N / (P·s)) samples and deals P·s of them: the
    # remaining N mod (P·s) samples go to no client, and no sample goes to two
    parts = partition(_labels(), P, "shards", params={"num_shards_per_partition": shards}, seed=1)
    joined = torch.cat(parts)
    shard = N // (P * shards)
    assert len(joined.unique()) == len(joined) == P * shards * shard
    assert all(len(p) == shards * shard for p in parts)


def test_seeded():
    labels = _labels()
    for method in ("iid", "dirichlet", "shards"):
        a, b = partition(labels, P, method, seed=5), partition(labels, P, method, seed=5)
        c = partition(labels, P, method, seed=6)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def _label_skew(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean over parts of the largest class share (1/C for iid, 1 for one class per part)."""
    shares = [labels[p].bincount(minlength=10).float() / len(p) for p in parts]
    return float(torch.stack([s.max() for s in shares]).mean())


def test_small_alpha_is_skewed():
    labels = torch.arange(2000) % 10
    iid = _label_skew(labels, partition(labels, 10, "iid"))
    mild = _label_skew(labels, partition(labels, 10, "dirichlet", params={"alpha": 100.0}))
    skew = _label_skew(
        labels,
        partition(labels, 10, "dirichlet", params={"alpha": 0.05, "min_partition_size": 1}),
    )
    assert iid < 0.2 and mild < 0.25 and skew > 0.6


class Overlapping(Partitioner):
    """A user partitioner that gives sample 0 to every partition (refused)."""

    def __init__(self, num_partitions: int) -> None:
        super().__init__()
        self._n = num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select([0, partition_id + 1])

    @property
    def num_partitions(self) -> int:
        return self._n


@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_overlapping_or_empty_partitions_are_refused():
    with pytest.raises(ValueError, match="more than one partition"):
        partition(_labels(), 3, target=f"{__name__}.Overlapping")
    with pytest.raises(ValueError, match="max number of attempts"):  # Flower's own refusal
        partition(torch.arange(40) % 2, 4, "dirichlet", params={"alpha": 0.01})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method": "pathological"}, "data.partition='pathological' is not one of"),
        ({"params": {"alpha": 0.0}, "method": "dirichlet"}, "data.partitioner.params.alpha=0.0"),
        ({"params": {"alpha": -1}, "method": "dirichlet"}, "data.partitioner.params.alpha=-1"),
        ({"params": {"alpha": [0.5, 0.0]}, "method": "dirichlet"}, "data.partitioner.params.alpha"),
        (
            {"params": {"num_shards_per_partition": 0}, "method": "shards"},
            "num_shards_per_partition=0",
        ),
        (
            {"params": {"shards_per_client": 2}, "method": "shards"},
            "params.shards_per_client: Shard",
        ),
        ({"params": {"seed": 1}}, "data.partitioner.params.seed: fedbgmd sets it"),
        ({"params": {"num_partitions": 3}}, "params.num_partitions: fedbgmd sets it"),
        (
            {"target": PATHOLOGICAL},
            "params.num_classes_per_partition: PathologicalPartitioner needs it",
        ),
        (
            {"target": PATHOLOGICAL, "params": {"num_classes_per_partition": 11}},
            "num_classes_per_partition=11 exceeds the data set's 10 classes",
        ),
        ({"target": "flwr_datasets.partitioner.Nope"}, "data.partitioner.target=flwr_datasets"),
        ({"target": "torch.nn.Linear"}, "not a subclass of flwr_datasets.partitioner.Partitioner"),
        ({"target": PATHOLOGICAL, "method": "dirichlet"}, "name two partitioners"),
    ],
)
def test_bad_partitioner_choices_name_their_key(kwargs, needle):
    problems = partitioner_problems(num_partitions=10, num_classes=10, **kwargs)
    assert any(needle in p for p in problems), problems


# ----------------------------------------------------------------------------- config and CLI


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["data.partition=dirichlet", "+data.partitioner.params.alpha=0"],
            "data.partitioner.params.alpha",
        ),
        (
            [
                f"data.partitioner.target={PATHOLOGICAL}",
                "+data.partitioner.params.num_classes_per_partition=5",
            ],
            "data.partitioner.params.num_classes_per_partition",  # synthetic smoke data: 4 classes
        ),
        (
            ["data.partition=shards", "+data.partitioner.params.num_shards_per_partition=-1"],
            "data.partitioner.params.num_shards_per_partition",
        ),
        (["data.partition=pathological"], "data.partition"),
    ],
)
def test_validate_refuses_bad_partitioner_config_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*overrides))
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_validate_accepts_every_mapped_scheme_and_a_target():
    for extra in (
        ["data.partition=dirichlet", "+data.partitioner.params.alpha=0.3"],
        ["data.partition=shards"],
        [
            f"data.partitioner.target={PATHOLOGICAL}",
            "+data.partitioner.params.num_classes_per_partition=2",
        ],
    ):
        validate(compose_cfg(*extra))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "data.partition=dirichlet +data.partitioner.params.alpha=-0.5",
            "data.partitioner.params.alpha=-0.5",
        ),
        (
            f"data.partitioner.target={PATHOLOGICAL} +data.partitioner.params.num_classes_per_partition=9",
            "data.partitioner.params.num_classes_per_partition=9 exceeds the data set's 4 classes",
        ),
    ],
)
def test_cli_exits_2_at_startup_naming_the_key(tmp_path, override, needle):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedbgmd.cli import entry; entry()",
            "experiment=smoke",
            *override.split(),
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "summary.json").exists()


# ----------------------------------------------------------------------------- the run's report


def test_partition_report_and_plot(tmp_path: Path):
    from fedbgmd.reporting.plots import plot_partitions
    from fedbgmd.server import write_partition_report
    from fedbgmd.workload import partitions

    cfg = compose_cfg("data.partition=shards", "num_clients=6")
    ds = make_synthetic(num_train=500, num_test=10, num_classes=4, seed=0)
    parts = partitions(cfg.data, cfg.num_clients, cfg.seed, ds.train.y)
    write_partition_report(cfg, tmp_path, parts, ds)
    report = json.loads((tmp_path / "partitions.json").read_text())
    assert report["partitioner"] == "flwr_datasets.partitioner.ShardPartitioner"
    assert report["params"] == {"num_shards_per_partition": 2}
    assert report["sizes"] == [len(p) for p in parts]
    # counted here independently: per client, how many of its samples carry each label
    assert report["class_counts"] == [
        [int((ds.train.y[p] == c).sum()) for c in range(4)] for p in parts
    ]
    # 500 // 12 = 41 per shard, 12 shards dealt: 8 samples belong to no client
    assert report["unassigned"] == 500 - 12 * 41 == 8
    assert plot_partitions(tmp_path).stat().st_size > 0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_resuming_a_run_saved_before_flower_datasets(tmp_path: Path, scheme: str):
    from omegaconf import OmegaConf

    from fedbgmd.cli import resumed_config

    saved = OmegaConf.to_container(compose_cfg(f"data.partition={scheme}"), resolve=True)
    assert isinstance(saved, dict)
    saved["data"].pop("partitioner")
    saved["data"].update(alpha=0.5, shards_per_client=2)  # the keys such a config.yaml holds
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    if scheme == "iid":  # the keys never acted on an iid split, which is unchanged: dropped
        cfg, _ = resumed_config([f"resume={tmp_path}"])
        assert "alpha" not in cfg.data and cfg.data.partitioner.target is None
    else:  # other partitions now: continuing would train on other clients' data
        with pytest.raises(ConfigError, match=r"data\.partition=dirichlet with data\.alpha"):
            resumed_config([f"resume={tmp_path}"])


# ----------------------------------------------------------------------------- data=hf


def _local_hf_dataset(folder: Path, classes: int = 3) -> None:
    """A tiny image-classification data set as a Hugging Face user would publish it (Image and
    ClassLabel features), written as train/test parquet files datasets.load_dataset reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    )
    folder.mkdir()
    for split, n in (("train", 60), ("test", 20)):
        pixels = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        ds = datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(p) for p in pixels],
                "label": [i % classes for i in range(n)],
            },
            features=features,
        )
        ds.to_parquet(str(folder / f"{split}.parquet"))
        np.save(folder / f"{split}_pixels.npy", pixels)  # the reference, read back below


def test_data_hf_loads_through_federated_dataset_and_partitions(tmp_path: Path):
    import numpy as np

    from fedbgmd.workload import load_data, partitions

    folder = tmp_path / "tiny"
    _local_hf_dataset(folder)
    cfg = compose_cfg(
        "data=hf",
        f"data.hf.dataset={folder}",
        f"data.root={tmp_path / 'cache'}",  # datasets' cache, not ~/.cache
        "num_clients=3",
        "data.partition=shards",
        "+data.partitioner.params.num_shards_per_partition=1",
    )
    validate(cfg)
    ds = load_data(cfg.data, cfg.seed)
    assert ds.num_classes == 3 and ds.input_shape == (1, 8, 8) and len(ds.train) == 60
    assert ds.train.y.tolist() == [i % 3 for i in range(60)]  # unshuffled: the partition shuffles
    pixels = torch.as_tensor(np.load(folder / "train_pixels.npy")).float() / 255
    mean, std = pixels.mean(), pixels.std()
    assert torch.allclose(ds.train.x[:, 0], (pixels - mean) / std, atol=1e-5)
    parts = partitions(cfg.data, cfg.num_clients, cfg.seed, ds.train.y)
    assert sorted(torch.cat(parts).tolist()) == list(range(60))
    assert all(len(ds.train.y[p].unique()) == 1 for p in parts)  # one class's 20 samples each


def test_data_hf_offline_is_a_clear_error(tmp_path: Path):
    # the hub is unreachable here; HF_HUB_OFFLINE makes datasets say so at once (no retries)
    code = (
        "from fedbgmd.data import load_hf_dataset, DatasetMissingError\n"
        "try:\n"
        f"    load_hf_dataset('ylecun/mnist', cache_dir={str(tmp_path)!r})\n"
        "except DatasetMissingError as err:\n"
        "    print(err)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "data=hf: flwr_datasets.FederatedDataset could not load 'ylecun/mnist'" in proc.stdout
    assert "needs internet" in proc.stdout and "local folder" in proc.stdout
