"""OmniscientHook: the simulation's omniscient adversary, which sees the honest updates.

One job: after validation, rewrite the Byzantine clients' rows of G_t with what the attack
crafts from the honest rows, then apply to those rows the checks every reply meets
(:func:`~fedbgmd.strategies.validation.row_rejections`). Simulation only: a real deployment has
no such hook. Its randomness is derived from (seed, round), so every engine replays it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedbgmd.attacks.base import OmniscientAttack
from fedbgmd.core import Aggregator
from fedbgmd.seeding import generator
from fedbgmd.strategies.validation import row_rejections


class OmniscientHook:
    """The attack, who is Byzantine, and the rule whose output it may probe."""

    def __init__(
        self,
        attack: OmniscientAttack,
        byzantine_ids: Iterable[int],
        aggregator: Aggregator,
        seed: int = 0,
    ) -> None:
        self.attack = attack
        self.byzantine_ids = frozenset(int(i) for i in byzantine_ids)
        self.aggregator = aggregator
        self.seed = seed

    def apply(self, updates: torch.Tensor, ids: list[int], server_round: int) -> torch.Tensor:
        """``updates`` with the Byzantine rows replaced (the same tensor when nothing is)."""
        byz = [i for i, cid in enumerate(ids) if cid in self.byzantine_ids]
        honest = [i for i, cid in enumerate(ids) if cid not in self.byzantine_ids]
        if not byz or not honest:
            return updates
        g = generator(self.seed, server_round, "omniscient", device=updates.device)
        # the adversary's trial aggregations must not advance a stateful aggregator
        agg = self.aggregator
        probe = agg.probe() if hasattr(agg, "probe") else agg
        fake = self.attack(
            updates[honest], len(byz), generator=g, aggregator=lambda x: probe(x).vector
        )
        out = updates.clone()
        out[byz] = fake.to(out.dtype)
        return out

    def rows(
        self,
        updates: torch.Tensor,
        ids: list[int],
        server_round: int,
        max_update_norm: float | None,
    ) -> tuple[torch.Tensor, list[str | None]]:
        """The rows (n, d) with the adversary's written in, and per row the reason it is
        rejected (``None``: kept) — only the rows it wrote are checked (the others passed
        validation). The one place of this rule: the fused engine calls it too."""
        out = self.apply(updates, ids, server_round)
        why: list[str | None] = [None] * len(ids)
        if out is updates:  # no Byzantine or no honest row among the accepted: nothing written
            return out, why
        byz = [r for r, cid in enumerate(ids) if cid in self.byzantine_ids]
        for r, w in zip(byz, row_rejections(out[byz], max_update_norm)):
            why[r] = w
        return out, why
