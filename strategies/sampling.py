"""Which clients train in a round — a seeded draw, the same on every engine and every replay.

- :class:`PartitionSampler` (fedbgmd's engines): ``clients_per_round`` of ``num_clients``
  partition ids from a generator derived from (seed, round, "sampling"), sorted; all of them when
  the round takes every client.
- :func:`sample_nodes` (any Flower app): the grid's nodes as Flower's FedAvg samples them
  (``fraction_train`` of the connected nodes, at least ``min_train_nodes``, after waiting for
  ``min_available_nodes``), drawn by the same kind of seeded generator instead of ``random``.
"""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.serverapp import Grid
from flwr.supercore import log as flwr_log

from fedbgmd.seeding import generator


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


def sample_nodes(
    grid: Grid,
    server_round: int,
    seed: int,
    fraction_train: float,
    min_train_nodes: int,
    min_available_nodes: int,
) -> list[int]:
    """Sorted node ids; waits (as FedAvg does, without end) until enough nodes connect."""
    size = max(int(len(list(grid.get_node_ids())) * fraction_train), min_train_nodes)
    need = max(min_available_nodes, size)
    while len(nodes := sorted(grid.get_node_ids())) < need:
        flwr_log(INFO, "Waiting for nodes to connect: %d connected (need %d).", len(nodes), need)
        time.sleep(1)
    g = generator(seed, server_round, "sampling")
    chosen = sorted(nodes[int(i)] for i in torch.randperm(len(nodes), generator=g)[:size])
    flwr_log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(chosen), len(nodes))
    return chosen
