"""PartitionSampler: which clients (partitions) train in a round — a seeded draw.

One job, and the same draw on every engine: ``clients_per_round`` of ``num_clients`` ids from a
generator derived from (seed, round, "sampling"), sorted; all of them when the round takes every
client.
"""

from __future__ import annotations

import torch

from fedbgmd.components import generator


class PartitionSampler:
    def __init__(self, num_clients: int, clients_per_round: int, seed: int = 0) -> None:
        if not 1 <= clients_per_round:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed

    def sample(self, server_round: int) -> list[int]:
        if self.clients_per_round >= self.num_clients:
            return list(range(self.num_clients))
        g = generator(self.seed, server_round, "sampling")
        perm = torch.randperm(self.num_clients, generator=g)[: self.clients_per_round]
        return sorted(int(i) for i in perm)
