"""Build the run's components from a validated config: aggregator, attack, Byzantine set, seeds.

Plug-ins are named either by a registered short name or by a dotted path (``target``) to the
user's own callable or class, so extending fedbgmd never means editing it. Problems found while
constructing plug-ins (unknown names, unknown parameters) are collected into one ConfigError.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedbgmd.attacks import get_attack, get_omniscient_attack
from fedbgmd.attacks.base import ClientAttack, OmniscientAttack
from fedbgmd.config import ConfigError, byzantine_count, clients_per_round
from fedbgmd.core import (
    AggregationResult,
    available_selectors,
    get_aggregator,
    register_selector,
)
from fedbgmd.data import Dataset, load_dataset, load_hf_dataset, partition
from fedbgmd.results import attack_label
from fedbgmd.training import OptimConfig


class PluginFailed(RuntimeError):
    """A plug-in (attack, aggregator, selector, strategy) raised: a bug that fails the run.

    Raised on the client side around attack calls, so that the server, which sees only an error
    reply, can tell a crashed attack from a hostile reply (see ``RobustStrategy.own_clients``)."""


def call_plugin(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its exception re-raised as PluginFailed naming ``what`` and
    carrying the traceback text (an error reply keeps only the message)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        raise PluginFailed(
            f"{what} raised {type(err).__name__}: {err}\n{traceback.format_exc()}"
        ) from err


def locate(path: str) -> Any:
    """Import ``package.module.attr`` (or ``package.module:attr``) and return the attribute."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"{path!r} is not a dotted path like 'my_module.MyClass'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from err


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from (seed, round, client id, purpose...), same on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
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


Aggregate = Callable[..., AggregationResult]


def build_aggregator(agg_cfg: Any) -> Aggregate:
    """The configured aggregator: ``target`` (user callable/class) or a registered ``name``."""
    params = dict(agg_cfg.params)
    if agg_cfg.target:
        obj = locate(agg_cfg.target)
        return obj(**params) if isinstance(obj, type) else _bind(obj, params)
    return get_aggregator(agg_cfg.name, **params)


def _bind(fn: Callable[..., Any], params: dict[str, Any]) -> Aggregate:
    if not params:
        return fn
    try:  # fail at startup, naming the parameter, not in round 1
        inspect.signature(fn).bind(None, None, **params)
    except TypeError as err:
        raise TypeError(f"{getattr(fn, '__name__', fn)}: {err} (params {sorted(params)})") from err

    def bound(x: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
        return fn(x, weights, **params)

    return bound


@dataclass(frozen=True)
class AttackSpec:
    """The run's adversary: which clients, and the client-side or omniscient attack object."""

    byzantine_ids: tuple[int, ...]
    client_attack: ClientAttack | None
    omniscient_attack: OmniscientAttack | None
    name: str


def build_attack(cfg: Any) -> AttackSpec:
    a = cfg.attack
    if a.name == "none" and a.target is None:
        return AttackSpec((), None, None, "none")
    # a user attack given only by attack.target (name left "none") attacks too
    ids = tuple(byzantine_ids(cfg.seed, cfg.num_clients, a.fraction))
    params = dict(a.params)
    if a.target:
        obj = locate(a.target)(**params)
    elif a.mode == "omniscient":
        obj = get_omniscient_attack(a.name, **params)
    else:
        obj = get_attack(a.name, **params)
    name = attack_label(a.name, a.target)
    if isinstance(obj, OmniscientAttack):
        return AttackSpec(ids, None, obj, name)
    if isinstance(obj, ClientAttack):
        return AttackSpec(ids, obj, None, name)
    raise ValueError(
        f"attack target {a.target!r} built a {type(obj).__name__}, which is neither a "
        "ClientAttack nor an OmniscientAttack (see fedbgmd.attacks.base)"
    )


def resolve_selector(name: str) -> str:
    """A registered block selector, or a user's ``fn(col_sq_norms, k, generator)`` given by
    dotted path (registered under that path on first use). Unknown names raise ValueError."""
    if name in available_selectors():
        return name
    if "." not in name:
        raise ValueError(
            f"unknown block selector {name!r}; valid: {', '.join(available_selectors())} "
            "or a dotted path to your function"
        )
    fn = locate(name)
    if not callable(fn):
        raise TypeError(f"block selector {name!r} is not callable")
    register_selector(name, fn)
    return name


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
    try:
        build_attack(cfg)
    except (ValueError, TypeError) as err:
        problems.append(f"attack: {err}")
    try:
        resolve_selector(cfg.strategy.block.selector)
    except (ValueError, TypeError) as err:
        problems.append(f"strategy.block.selector: {err}")
    try:
        strategy_class(cfg)
    except (ValueError, TypeError) as err:
        problems.append(f"strategy.target: {err}")
    if problems:
        raise ConfigError(problems)
    for warning in assumption_warnings(cfg):
        logging.getLogger("fedbgmd").warning(warning)


_F_RULES = ("krum", "multikrum", "bulyan", "bulyan_multikrum")
_BETA_RULES = ("ctm", "norm_filter")


def assumption_warnings(cfg: Any) -> list[str]:
    """An aggregator's assumed Byzantine count set apart from the attack's (legal, but usually a
    mistake): Krum/Bulyan's f against ⌊fraction · clients per round⌋, CTM's and NC_β's β below
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
    if agg.name in _BETA_RULES:
        beta = float(params.get("beta", 0.1))
        if beta < fraction:
            return [
                f"strategy.aggregator.params.beta={beta} < attack.fraction={fraction}: "
                f"{agg.name} trims fewer rows than there are Byzantine clients"
            ]
    return []


def plugin_params(cfg: Any, path: str) -> list[str] | None:
    """Parameter names the chosen built-in plug-in at ``path`` takes (``strategy.aggregator.params``,
    ``attack.params``), read from its constructor; None for other paths, user targets, or when
    it cannot be built without parameters."""
    try:
        if path == "strategy.aggregator.params" and not cfg.strategy.aggregator.target:
            obj: Any = get_aggregator(cfg.strategy.aggregator.name)
        elif path == "attack.params" and not cfg.attack.target and cfg.attack.name != "none":
            a = cfg.attack
            obj = get_omniscient_attack(a.name) if a.mode == "omniscient" else get_attack(a.name)
        else:
            return None
        sig = inspect.signature(type(obj))
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in sig.parameters.items() if p.kind in kinds]


def strategy_class(cfg: Any) -> type:
    from fedbgmd.strategies import RobustStrategy

    cls = locate(cfg.strategy.target)
    if not (isinstance(cls, type) and issubclass(cls, RobustStrategy)):
        raise TypeError(f"{cfg.strategy.target} must be a subclass of RobustStrategy")
    return cls


def optim_config(cfg: Any) -> OptimConfig:
    o = cfg.client.optimizer
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


def load_data(cfg: Any) -> Dataset:
    """The configured data set (never silently replaced: a missing one raises DatasetMissingError)."""
    d = cfg.data
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
            "seed": cfg.seed,
        }
        if d.image_shape:
            extra["shape"] = tuple(d.image_shape)
    return load_dataset(d.name, root=d.root, download=d.download, **extra)


def partitions(cfg: Any, labels: torch.Tensor) -> list[torch.Tensor]:
    """The clients' index sets: data.partition or data.partitioner through Flower Datasets."""
    d = cfg.data
    return partition(
        labels,
        cfg.num_clients,
        d.partition,
        target=d.partitioner.target,
        params=d.partitioner.params,
        seed=cfg.seed,
    )


def model_kwargs(cfg: Any) -> dict[str, Any]:
    return {"hidden": tuple(cfg.model.hidden)} if cfg.model.name == "mlp" else {}
