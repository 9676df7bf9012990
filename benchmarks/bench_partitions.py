"""Time to split 60,000 labels (10 classes) among 10 and 100 clients through Flower Datasets'
partitioners (fedbgmd.partitions.partition), min of 3 after a warm-up; docs/partitions.md.

    python benchmarks/bench_partitions.py
"""

from __future__ import annotations

import time

import torch

from fedbgmd.partitions import partition

labels = torch.arange(60_000) % 10
partition(labels, 10, "iid", seed=0)  # warm-up: imports datasets and flwr_datasets
for scheme in ("iid", "dirichlet", "shards"):
    cells = []
    for clients in (10, 100):
        best = float("inf")
        for seed in range(3):
            t0 = time.perf_counter()
            partition(labels, clients, scheme, seed=seed)
            best = min(best, time.perf_counter() - t0)
        cells.append(f"{best:.2f} s")
    print(f"| {scheme} | " + " | ".join(cells) + " |")
