"""Which jobs of a sweep fuse, and with which: the rules read from the config, before anything
is built (:func:`fuse_reason`, :func:`group_key`), and :class:`Unfusable` for what only shows
once the data and model are built (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedbgmd.reporting.setting import BUILTIN_STRATEGY_TARGETS

# non-omniscient attacks that ask the client for extra honest updates (sample_updates)
_NEEDS_SAMPLES = frozenset({"alie", "ipm"})


def fuse_reason(cfg: Any) -> str | None:
    """Why ``cfg`` cannot be fused (None: it can)."""
    c = cfg.client
    if cfg.engine.name == "deployment":
        return "the deployment engine runs real SuperNodes"
    if cfg.resume:
        return "resume continues a single run from its checkpoint"
    if cfg.strategy.target not in BUILTIN_STRATEGY_TARGETS:
        return f"custom strategy class {cfg.strategy.target}"
    if c.local_epochs is not None or c.local_steps != 1:
        return "only local_steps=1 is fused (H > 1 or local epochs run alone)"
    if c.optimizer.name != "sgd":
        return f"client optimizer {c.optimizer.name!r} (only sgd is fused)"
    if c.quantization.method != "none":
        return f"quantized messages ({c.quantization.method})"
    a = cfg.attack
    if a.mode != "omniscient" and a.name in _NEEDS_SAMPLES and a.target is None:
        return f"attack {a.name!r} trains extra local updates on the client"
    if a.target is None and a.name != "none" and a.mode != "omniscient":
        from fedbgmd.attacks import get_attack

        if get_attack(a.name, **dict(a.params)).kind == "message":
            return f"message attack {a.name!r} (acts on serialised arrays)"
    if cfg.model.name == "resnet18":
        return "models with buffers (BatchNorm running statistics)"
    return None


def group_key(cfg: Any) -> str:
    """Jobs with equal keys can advance in lockstep (see the module docstring)."""
    from fedbgmd.config import clients_per_round, plain

    c = plain(cfg)
    client = dict(c["client"])
    # the client optimiser (SGD, see fuse_reason) is per run: lr, schedule, momentum, decay
    client.pop("optimizer")
    data = dict(c["data"])
    # partitions are per run; the data itself depends on the seed only when it is generated
    data_seed = c["seed"] if data["name"] == "synthetic" else None
    key = {
        "data": data,
        "data_seed": data_seed,
        "model": c["model"],
        "client": client,
        "num_clients": c["num_clients"],
        "clients_per_round": clients_per_round(cfg),
        "num_rounds": c["num_rounds"],
        "device": c["device"],
        "eval": (c["eval_every"], c["eval_batch_size"], c["max_eval_samples"]),
    }
    return repr(sorted(key.items()))


def plan_groups(cfgs: Sequence[Any]) -> tuple[list[list[int]], dict[int, str]]:
    """(groups of job indices that fuse, {job index: reason} for the jobs that run alone)."""
    alone: dict[int, str] = {}
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = fuse_reason(cfg)
        if reason is not None:
            alone[i] = reason
            continue
        groups.setdefault(group_key(cfg), []).append(i)
    return list(groups.values()), alone


class Unfusable(ValueError):
    """Some jobs of a group turned out not to fuse once the data and model were built.

    ``reasons`` maps their positions in the group to why; the rest of the group can go on.
    """

    def __init__(self, reasons: dict[int, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"job {k}: {v}" for k, v in sorted(reasons.items())))
