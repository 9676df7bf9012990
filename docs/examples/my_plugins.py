"""Worked example: a custom aggregator and a custom strategy, used from the CLI without editing fedbgmd."""

from __future__ import annotations

import torch

from fedbgmd.core import AggregationResult
from fedbgmd.strategies import RobustStrategy


def medoid(x: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """The client update with the smallest summed distance to all the others."""
    dist = torch.cdist(x.double(), x.double()).sum(dim=1)
    best = int(dist.argmin())
    return AggregationResult(vector=x[best].clone(), selected=torch.tensor([best]))


def largest_magnitude_block(col_sq_norms: torch.Tensor, k: int, generator=None) -> torch.Tensor:
    """A block selector: the k coordinates with the largest column norms, returned sorted."""
    return torch.topk(col_sq_norms, k).indices.sort().values


class DropLargestStrategy(RobustStrategy):
    """Discards the `drop` updates with the largest norms, then applies the configured aggregator."""

    def __init__(self, *, drop: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.drop = drop

    def aggregate_updates(self, updates, client_ids, server_round, weights=None):
        keep = updates.norm(dim=1).argsort()[: max(1, len(updates) - self.drop)].sort().values
        ids = [client_ids[i] for i in keep.tolist()]
        direction, diagnostics = super().aggregate_updates(updates[keep], ids, server_round)
        diagnostics["dropped"] = float(len(updates) - len(keep))
        return direction, diagnostics
