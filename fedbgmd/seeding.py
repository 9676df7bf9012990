"""Seeded randomness of a run: every random choice draws from a generator derived from (seed,
round, client id, purpose...), so a round replays identically on any engine, in any order, on
any machine."""

from __future__ import annotations

import hashlib

import torch

from fedbgmd.config import byzantine_count

__all__ = ["byzantine_ids", "derive_seed", "generator"]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from (seed, round, client id, purpose...), same on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def byzantine_ids(seed: int, num_clients: int, fraction: float) -> list[int]:
    """⌊fraction·N⌋ partition ids drawn once by a seeded generator (fixed for the whole run)."""
    count = byzantine_count(fraction, num_clients)
    if count == 0:
        return []
    perm = torch.randperm(num_clients, generator=generator(seed, "byzantine"))
    return sorted(int(i) for i in perm[:count])
