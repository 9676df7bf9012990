"""The run's workload from its typed sub-configs: the data set and its split among the clients,
the model's extra arguments, the clients' optimiser settings."""

from __future__ import annotations

from typing import Any

import torch

from fedbgmd.data import Dataset, load_dataset, load_hf_dataset
from fedbgmd.partitions import partition
from fedbgmd.training import OptimConfig

__all__ = ["load_data", "model_kwargs", "optim_config", "partitions"]


def load_data(d: Any, seed: int) -> Dataset:
    """The data set of the ``data`` sub-config ``d`` (never silently replaced: a missing one
    raises DatasetMissingError); ``seed`` draws the synthetic task."""
    if d.name == "hf":
        h = d.hf
        return load_hf_dataset(
            h.dataset,
            h.subset,
            h.feature_key,
            h.label_key,
            h.train_split,
            h.test_split,
            cache_dir=d.root,
        )
    extra: dict[str, Any] = {}
    if d.name == "synthetic":
        extra = {
            "num_train": d.num_train,
            "num_test": d.num_test,
            "num_features": d.num_features,
            "num_classes": d.num_classes,
            "seed": seed,
        }
        if d.image_shape:
            extra["shape"] = tuple(d.image_shape)
    return load_dataset(d.name, root=d.root, download=d.download, **extra)


def partitions(d: Any, num_clients: int, seed: int, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each client's sample indices, split as the ``data`` sub-config ``d`` says
    (data.partition or data.partitioner, through Flower Datasets)."""
    return partition(
        labels,
        num_clients,
        d.partition,
        target=d.partitioner.target,
        params=d.partitioner.params,
        seed=seed,
    )


def model_kwargs(m: Any) -> dict[str, Any]:
    """Extra constructor arguments of the ``model`` sub-config ``m``'s model."""
    return {"hidden": tuple(m.hidden)} if m.name == "mlp" else {}


def optim_config(o: Any) -> OptimConfig:
    """The training module's optimiser settings from the ``client.optimizer`` sub-config."""
    return OptimConfig(
        name=o.name,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        schedule=o.schedule,
        step_gamma=o.step_gamma,
        step_every=o.step_every,
        cosine_t_max=o.cosine_t_max,
        min_lr=o.min_lr,
    )
