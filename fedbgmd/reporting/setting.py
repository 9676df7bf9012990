"""What defines a setting: the one rule by which runs are labelled, grouped and told apart.

A run's **setting** is its config without the keys that cannot change what it learns
(:data:`NO_OUTCOME_KEYS`: the seed, the engine, the device, evaluation cadence, checkpoints, ...).
Two runs are of one setting (averaged together over seeds, or taken for repeats of one another)
exactly when their settings agree; a key one run's config lacks (added in a later version) is
no difference.

Part of it is **named** (:func:`setting_from_config`): strategy, attack, attack.fraction, data,
model, block beta/selector/memory, attack.params, num_clients, num_rounds, with values normalised
so that equal runs compare equal (a user plug-in in the strategy's label, no block keys when block
selection is off, fraction 0 and no attack parameters without an attack). summary.json records the
named part under ``"setting"`` (with the labels :func:`run_labels`), and reports always show it.
The rest of the setting is :func:`outcome_config`, the dotted config leaves; a report shows those of
its keys that differ between runs with equal named parts (:func:`splitting_keys`), e.g. a learning
rate swept at one strategy. A named key wins over the config leaf of the same dotted name.

Plain python: no flwr, hydra or torch imports here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "NO_OUTCOME_KEYS",
    "attack_label",
    "outcome_config",
    "plugin_targets",
    "recorded_setting",
    "run_labels",
    "setting_from_config",
    "splitting_keys",
]

# config keys that do not change what a run learns: never part of a setting
NO_OUTCOME_KEYS: tuple[str, ...] = (
    "seed",
    "engine",
    "device",
    "plots",
    "progress",
    "resume",
    "eval_every",
    "checkpoint_every",
    "checkpoint_last",
    "eval_batch_size",
    "data.root",
    "data.download",
)

# attack labels that mean "no attack" (older runs and reference files spell it several ways)
CLEAN_ATTACKS = ("none", "clean", "no_attack", "null", "")

DEFAULT_STRATEGY_TARGET = "fedbgmd.strategies.RobustStrategy"
# the strategy classes fedbgmd ships (a preset's target is not a user plug-in)
BUILTIN_STRATEGY_TARGETS = frozenset({DEFAULT_STRATEGY_TARGET, "fedbgmd.strategies.FedBGMD"})


def is_clean(attack: object) -> bool:
    return str(attack).strip().lower() in CLEAN_ATTACKS


def _section(node: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = node.get(key)
    return value if isinstance(value, Mapping) else {}


def setting_from_config(config: Mapping[Any, Any]) -> dict[str, Any]:
    """The named part of a run's setting (see the module docstring), for grouping runs across
    seeds in reports.

    ``config`` is a resolved config as plain nested dicts (what summary.json keeps under
    ``"config"``), so reports can recompute settings of old runs without Hydra. The block and
    attack keys are what tell the seed's "paper" variant from "as_run" (memory, selector,
    attack scale): runs that differ there are never averaged together or deduplicated as repeats.
    """
    strategy, attack = _section(config, "strategy"), _section(config, "attack")
    block = _section(strategy, "block")
    enabled = bool(block.get("enabled"))
    label = attack_label(attack.get("name", "none"), attack.get("target"))
    attacked = label != "none"  # no Byzantine clients without an attack
    targets = plugin_targets(config)
    custom = [f"{role}={targets[role]}" for role in ("strategy", "aggregator") if role in targets]
    return {
        # a user's strategy class or aggregator runs under the preset's name: the label says
        # which code ran, so it is never grouped with (or read as) the built-in
        "strategy": (
            f"{strategy.get('name')}[{', '.join(custom)}]" if custom else strategy.get("name")
        ),
        "attack": label,
        "attack.fraction": float(attack.get("fraction", 0.0)) if attacked else 0.0,
        "data": _section(config, "data").get("name"),
        "model": _section(config, "model").get("name"),
        "strategy.block.beta": _number(block.get("beta"), float) if enabled else None,
        "strategy.block.selector": str(block.get("selector")) if enabled else None,
        "strategy.block.memory": str(block.get("memory")) if enabled else None,
        "attack.params": dict(sorted(dict(attack.get("params") or {}).items())) if attacked else {},
        "num_clients": _number(config.get("num_clients"), int),
        "num_rounds": _number(config.get("num_rounds"), int),
    }


def outcome_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """The rest of a run's setting: the dotted keys of a saved config (leaves only, values
    hashable), without the keys in NO_OUTCOME_KEYS."""
    out: dict[str, Any] = {}
    if not isinstance(config, dict):
        return out
    for k, v in config.items():
        key = f"{prefix}{k}"
        if key in NO_OUTCOME_KEYS or key.startswith(tuple(f"{x}." for x in NO_OUTCOME_KEYS)):
            continue
        if isinstance(v, dict) and v:
            out.update(outcome_config(v, key + "."))
        else:
            out[key] = hashable(v)
    return out


def splitting_keys(named: Sequence[tuple[Any, ...]], flats: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs with equal named settings: the part of the
    setting a report must show besides the named keys. ``named``: each run's named values (as
    :func:`hashable`), ``flats``: each run's :func:`outcome_config`."""
    by_setting: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for key, flat in zip(named, flats):
        by_setting.setdefault(key, []).append(flat)
    found: list[str] = []
    for same in by_setting.values():
        for k in sorted(set().union(*same)):
            if k not in found and len({f[k] for f in same if k in f}) > 1:
                found.append(k)
    return found


def recorded_setting(summary: dict[str, Any]) -> dict[str, Any]:
    """The named setting a summary.json records, with the keys older runs did not record
    derived from their saved config by :func:`setting_from_config`, so old and new runs of one
    setting group together and runs that differ there (e.g. the paper vs as_run memory) never
    merge."""
    s = summary.get("setting")
    if isinstance(s, dict) and s:
        setting = dict(s)
    else:  # no recorded setting: derive it from the saved config rather than group by three keys
        setting = {k: summary[k] for k in ("strategy", "attack", "fraction") if k in summary}
    config = summary.get("config")
    if not isinstance(config, dict):
        return setting
    try:
        derived = setting_from_config(config)
    except (TypeError, ValueError):  # a damaged config (e.g. a number that is not one)
        return setting
    for key, value in derived.items():
        setting.setdefault(key, value)
    return setting


def plugin_targets(config: Mapping[Any, Any]) -> dict[str, str]:
    """The user plug-ins a run used, by role (strategy, aggregator, selector, attack): their
    dotted paths. Empty when only built-ins ran."""
    strategy = _section(config, "strategy")
    found = {
        "strategy": strategy.get("target"),
        "aggregator": _section(strategy, "aggregator").get("target"),
        "selector": _section(strategy, "block").get("selector"),
        "attack": _section(config, "attack").get("target"),
    }
    if found["strategy"] in BUILTIN_STRATEGY_TARGETS:
        found["strategy"] = None
    if "." not in str(found["selector"] or ""):  # a registered name, not a user function
        found["selector"] = None
    return {role: str(path) for role, path in found.items() if path}


def run_labels(config: Mapping[Any, Any]) -> dict[str, Any]:
    """What summary.json says ran (every writer of a summary uses this one function)."""
    setting = setting_from_config(config)
    return {
        "strategy": setting["strategy"],
        "attack": setting["attack"],
        "fraction": setting["attack.fraction"],
        "setting": setting,
        "targets": plugin_targets(config),
        "seed": config.get("seed"),
    }


def attack_label(name: Any, target: Any) -> str:
    """The attack a run used: a user class given by ``attack.target`` wins over the registry name
    (it is what gets built), so a target-only attack never reads as the clean run ``"none"``."""
    return str(target) if target else str(name)


def hashable(v: Any) -> Any:
    """A setting value as a dict key (dicts and lists as sorted JSON)."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


def _number(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None else kind(value)
