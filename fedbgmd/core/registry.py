"""The one name -> plug-in registry of fedbgmd: aggregators, block selectors, memories,
quantizers and attacks (client and omniscient) all use :class:`Registry`.

Rules (DESIGN.md item 5; tested for every kind by tests/core/test_core_registry.py):

* an unknown name raises ``ValueError`` listing the valid names (a renamed one names its new
  spelling);
* building with an unknown keyword raises ``TypeError`` naming it and the accepted ones (a
  renamed parameter names its new spelling);
* registering a taken name raises ``ValueError`` unless ``replace=True`` is passed explicitly.

Built-in entries are added by one idempotent loader the first time the registry is used, not as
an import side effect. Two kinds of entry:

* factories (aggregators, memories, attacks): ``build(name, **params)`` returns
  ``factory(**params)``;
* functions called later with fixed leading arguments (selectors ``fn(col_sq_norms, k,
  generator)``, quantizers ``fn(v, generator, **params)``): declared with ``call_args``;
  ``build(name, **params)`` returns the function with ``params`` bound.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "check_kwargs"]


def check_kwargs(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    skip: int = 0,
    renamed: Mapping[str, str] | None = None,
) -> None:
    """Raise ``TypeError`` naming every keyword in ``params`` that ``factory`` does not accept
    (``skip``: how many leading arguments are supplied at call time, not parameters)."""
    renamed = renamed or {}
    old = sorted(set(params) & set(renamed))
    if old:
        raise TypeError(
            f"{kind} {name!r}: parameter(s) {old} renamed; use "
            f"{', '.join(f'{renamed[o]!r} (was {o!r})' for o in old)}"
        )
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in list(sig.parameters.values())[skip:] if p.kind in kinds]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    unknown = set() if var_kw else set(params) - set(accepted)
    unknown |= set(params) & {p for p in list(sig.parameters)[:skip]}
    if unknown:
        raise TypeError(
            f"{kind} {name!r} got unknown parameter(s) {sorted(unknown)}; "
            f"accepted: {sorted(accepted)}"
        )


class Registry(Mapping[str, Callable[..., Any]], Generic[T]):
    """Maps short names to factories ``factory(**params) -> T`` (or, with ``call_args``, to
    functions called later as ``fn(*call_args, **params)``).

    A read-only Mapping of name -> factory (``reg["gm"]``, ``"gm" in reg``, ``sorted(reg)``).

    Args:
        kind: what is registered, used in error messages ("aggregator", "selector", ...).
        loader: idempotent function registering the built-in entries; called lazily once.
        call_args: names of the leading arguments a function entry receives at call time.
        check: called as ``check(name, factory)`` on registration; raises to refuse an entry
            (an attack class that is not a ClientAttack).
    """

    def __init__(
        self,
        kind: str,
        loader: Callable[[Registry[T]], None] | None = None,
        *,
        call_args: tuple[str, ...] = (),
        check: Callable[[str, Callable[..., Any]], None] | None = None,
    ) -> None:
        self.kind = kind
        self.call_args = call_args
        self._loader = loader
        self._loaded = loader is None
        self._check = check
        self._entries: dict[str, Callable[..., Any]] = {}
        self._renamed: dict[str, str] = {}
        self._renamed_params: dict[str, dict[str, str]] = {}

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader(self)

    def register(self, name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
        """Register ``factory`` under ``name``; a taken name raises ``ValueError`` unless
        ``replace=True`` (an explicit override of an earlier entry)."""
        self._ensure_loaded()
        self._add(name, factory, replace=replace)

    def _add(self, name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"{self.kind} factory for {name!r} must be callable")
        if name in self._renamed:
            raise ValueError(
                f"{self.kind} {name!r} is a former name of {self._renamed[name]!r}; pick another"
            )
        if self._check is not None:
            self._check(name, factory)
        if name in self._entries and not replace:
            by = getattr(self._entries[name], "__qualname__", repr(self._entries[name]))
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {by}); pass replace=True to "
                "override it"
            )
        self._entries[name] = factory

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's or a session's own entry); unknown names raise ValueError."""
        self.factory(name)
        del self._entries[name]

    def rename(self, old: str, new: str) -> None:
        """Record that ``old`` is now spelt ``new``: looking ``old`` up names ``new``."""
        self._renamed[old] = new

    def rename_param(self, name: str, old: str, new: str) -> None:
        """Record that entry ``name``'s parameter ``old`` is now spelt ``new``."""
        self._renamed_params.setdefault(name, {})[old] = new

    def renamed_to(self, old: str) -> str | None:
        """The current name of a former name ``old`` (None: ``old`` was never renamed)."""
        self._ensure_loaded()
        return self._renamed.get(old)

    def renamed_param(self, old: str) -> dict[str, str]:
        """{entry: its current parameter name} for the entries whose parameter ``old`` was
        renamed (empty: none was)."""
        self._ensure_loaded()
        return {n: r[old] for n, r in sorted(self._renamed_params.items()) if old in r}

    def factory(self, name: str) -> Callable[..., Any]:
        """Return the factory for ``name``; unknown names raise ``ValueError`` listing valid ones."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config
            if isinstance(name, str) and name in self._renamed:
                raise ValueError(
                    f"{self.kind} {name!r} was renamed {self._renamed[name]!r}"
                ) from None
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._entries))}"
            ) from None

    def check_params(self, name: str, params: Mapping[str, Any]) -> None:
        """Raise TypeError naming any parameter of ``params`` that entry ``name`` does not take."""
        fac = self.factory(name)
        skip = len(self.call_args)
        check_kwargs(self.kind, name, fac, params, skip, self._renamed_params.get(name))

    def build(self, name: str, **params: Any) -> T:
        """The entry ``name`` built with keyword ``params`` (checked against its signature):
        ``factory(**params)``, or for a registry with ``call_args`` the function with
        ``params`` bound."""
        self.check_params(name, params)
        fac = self.factory(name)
        if self.call_args:
            return functools.partial(fac, **params) if params else fac  # type: ignore[return-value]
        return fac(**params)  # type: ignore[no-any-return]

    def params_of(self, name: str) -> list[str]:
        """The parameter names entry ``name`` takes (its keyword arguments)."""
        try:
            sig = inspect.signature(self.factory(name))
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            return []
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        rest = list(sig.parameters.values())[len(self.call_args) :]
        return [p.name for p in rest if p.kind in kinds]

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._ensure_loaded()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        self._ensure_loaded()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
