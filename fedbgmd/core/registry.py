"""A small name -> factory registry shared by aggregators and block selectors.

Rules (DESIGN.md item 5): registering a name twice raises ``ValueError``; looking up an unknown
name raises ``ValueError`` listing the valid names; building with an unknown keyword raises
``TypeError`` naming the keyword and the accepted ones. Built-in entries are added by one
idempotent loader function the first time the registry is used, not as an import side effect.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "check_kwargs"]


def check_kwargs(kind: str, name: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming every keyword in ``params`` that ``factory`` does not accept."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"{kind} {name!r} got unknown parameter(s) {unknown}; accepted: {sorted(accepted)}"
        )


class Registry(Generic[T]):
    """Maps short names to factories ``factory(**params) -> T``.

    Args:
        kind: what is registered, used in error messages ("aggregator", "selector").
        loader: idempotent function registering the built-in entries; called lazily once.
    """

    def __init__(self, kind: str, loader: Callable[[Registry[T]], None] | None = None) -> None:
        self.kind = kind
        self._loader = loader
        self._loaded = loader is None
        self._entries: dict[str, Callable[..., T]] = {}

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader(self)

    def register(self, name: str, factory: Callable[..., T]) -> None:
        """Register ``factory`` under ``name``; a duplicate name raises ``ValueError``."""
        self._ensure_loaded()
        self._add(name, factory)

    def _add(self, name: str, factory: Callable[..., T]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"{self.kind} factory for {name!r} must be callable")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = factory

    def factory(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name``; unknown names raise ``ValueError`` listing valid ones."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {sorted(self._entries)}"
            ) from None

    def build(self, name: str, **params: Any) -> T:
        """Build the entry ``name`` with keyword ``params`` (validated against its signature)."""
        fac = self.factory(name)
        check_kwargs(self.kind, name, fac, params)
        return fac(**params)

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._ensure_loaded()
        return sorted(self._entries)
