"""Build the run's plug-ins from their typed sub-configs: aggregator, attack, block selector.

Plug-ins are named either by a registered short name (the registries of :mod:`fedbgmd.core` and
:mod:`fedbgmd.attacks`) or by a dotted path (``target``) to the user's own callable or class, so
extending fedbgmd never means editing it. Below the strategies and clients (they import this
module, never the other way round); the startup check that reports every bad plug-in at once
is :func:`fedbgmd.checks.check_components`.
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedbgmd.attacks import get_attack, get_omniscient_attack
from fedbgmd.attacks.base import ClientAttack, OmniscientAttack
from fedbgmd.core import SELECTORS, AggregationResult, get_aggregator
from fedbgmd.reporting.setting import attack_label
from fedbgmd.seeding import byzantine_ids

__all__ = [
    "AttackSpec",
    "PluginFailed",
    "build_aggregator",
    "build_attack",
    "call_plugin",
    "locate",
    "resolve_selector",
]


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


Aggregate = Callable[..., AggregationResult]


def build_aggregator(agg_cfg: Any) -> Aggregate:
    """The configured aggregator (``strategy.aggregator``): ``target`` (user callable/class) or
    a registered ``name``."""
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


def build_attack(a: Any, seed: int, num_clients: int) -> AttackSpec:
    """The adversary of the ``attack`` sub-config ``a`` in a run of ``num_clients`` clients."""
    if a.name == "none" and a.target is None:
        return AttackSpec((), None, None, "none")
    # a user attack given only by attack.target (name left "none") attacks too
    ids = tuple(byzantine_ids(seed, num_clients, a.fraction))
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
    if name in SELECTORS:
        return name
    if "." not in name:
        raise ValueError(
            f"unknown block selector {name!r}; valid: {', '.join(SELECTORS.names())} "
            "or a dotted path to your function"
        )
    fn = locate(name)
    if not callable(fn):
        raise TypeError(f"block selector {name!r} is not callable")
    SELECTORS.register(name, fn)
    return name
