"""Startup checks of the plug-ins a config names (config layer, run once by the CLI before any
run starts): every plug-in is built once, so that bad names and parameters fail before round 1,
all reported in one ConfigError; and the warnings for legal but suspicious settings."""

from __future__ import annotations

import logging
from typing import Any

from fedbgmd.attacks import ATTACKS, OMNISCIENT_ATTACKS
from fedbgmd.config import ConfigError, byzantine_count, clients_per_round, validate
from fedbgmd.core import AGGREGATORS
from fedbgmd.plugins import build_aggregator, build_attack, resolve_selector
from fedbgmd.reporting.setting import attack_label

__all__ = ["assumption_warnings", "check_components", "check_config", "plugin_params"]


def check_config(cfg: Any) -> None:
    """Schema-level and cross-field checks plus constructing every plug-in once."""
    validate(cfg)
    check_components(cfg)


def check_components(cfg: Any) -> None:
    """Construct every plug-in once so that bad names/params fail at startup, all reported."""
    problems: list[str] = []
    try:
        agg = build_aggregator(cfg.strategy.aggregator)
        if cfg.strategy.weighted and getattr(agg, "supports_weights", True) is False:
            problems.append(
                f"strategy.weighted=true, but aggregator {cfg.strategy.aggregator.name!r} has "
                "no weighted form; set strategy.weighted=false"
            )
    except (ValueError, TypeError) as err:
        problems.append(f"strategy.aggregator: {err}")
    attack = None
    try:
        attack = build_attack(cfg.attack, cfg.seed, cfg.num_clients)
    except (ValueError, TypeError) as err:
        problems.append(f"attack: {err}")
    try:
        resolve_selector(cfg.strategy.block.selector)
    except (ValueError, TypeError) as err:
        problems.append(f"strategy.block.selector: {err}")
    from fedbgmd.server import build_strategy, strategy_class  # Flower: only when checking

    try:
        strategy_class(cfg.strategy.target)
    except (ValueError, TypeError) as err:
        problems.append(f"strategy.target: {err}")
    if problems:
        raise ConfigError(problems)
    _check_strategy(cfg, build_strategy, attack)
    for warning in assumption_warnings(cfg):
        logging.getLogger("fedbgmd").warning(warning)


def _check_strategy(cfg: Any, build_strategy: Any, attack: Any) -> None:
    """The strategy itself, built once as the run will build it: a misspelt ``strategy.params``
    key, a block step over a stateful aggregator, a bad block setting fail here (exit 2), not in
    the run's first round."""
    import torch

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # FedAvg's own notes are said again when the run builds it
    try:
        build_strategy(cfg, torch.device("cpu"), attack, 1.0)
    except Exception as err:  # a user's strategy class may raise anything from its constructor
        raise ConfigError([f"strategy: {type(err).__name__}: {err}"]) from None
    finally:
        flwr_logger.setLevel(level)


_F_RULES = ("krum", "multikrum", "bulyan", "bulyan_multikrum")
_TRIM_RULES = ("ctm", "norm_filter")


def assumption_warnings(cfg: Any) -> list[str]:
    """An aggregator's assumed Byzantine count set apart from the attack's (legal, but usually a
    mistake): Krum/Bulyan's f against ⌊fraction · clients per round⌋, CTM's and NC_β's trim below
    the attack's fraction."""
    agg, a = cfg.strategy.aggregator, cfg.attack
    if agg.target is not None:
        return []
    fraction = a.fraction if attack_label(a.name, a.target) != "none" else 0.0
    params = dict(agg.params)
    if agg.name in _F_RULES:
        f, per_round = int(params.get("f", 0)), clients_per_round(cfg)
        byz = byzantine_count(fraction, per_round)
        if f != byz:
            return [
                f"strategy.aggregator.params.f={f}, but attack.fraction={fraction} makes "
                f"{byz} Byzantine clients in a round of {per_round}: {agg.name} assumes f"
            ]
    if agg.name in _TRIM_RULES:
        trim = float(params.get("trim", 0.1))
        if trim < fraction:
            return [
                f"strategy.aggregator.params.trim={trim} < attack.fraction={fraction}: "
                f"{agg.name} trims fewer rows than there are Byzantine clients"
            ]
    return []


def plugin_params(cfg: Any, path: str) -> list[str] | None:
    """Parameter names the chosen built-in plug-in at ``path`` takes (``strategy.aggregator.params``,
    ``attack.params``), read from its registry entry; None for other paths, user targets and
    unknown names."""
    try:
        if path == "strategy.aggregator.params" and not cfg.strategy.aggregator.target:
            return AGGREGATORS.params_of(cfg.strategy.aggregator.name)
        a = cfg.attack
        if path == "attack.params" and not a.target and a.name != "none":
            reg = OMNISCIENT_ATTACKS if a.mode == "omniscient" else ATTACKS
            return reg.params_of(a.name)
    except ValueError:
        return None
    return None
