"""One registry type for every kind of plug-in (issue 20, item 4): aggregators, block selectors,
memories, quantizers and attacks share fedbgmd.core.Registry, so each kind gets the same three
answers: unknown name -> ValueError listing the valid names, unknown parameter -> TypeError naming
it, a taken name -> ValueError (unless replace=True); and a renamed name or parameter names its
new spelling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fedbgmd.attacks import (
    ATTACKS,
    OMNISCIENT_ATTACKS,
    AlieAttack,
    OmniscientAlie,
    get_attack,
    get_omniscient_attack,
    register_attack,
    register_omniscient_attack,
)
from fedbgmd.core import (
    AGGREGATORS,
    MEMORIES,
    QUANTIZERS,
    SELECTORS,
    Registry,
    get_aggregator,
    make_memory,
    quantize,
    register_aggregator,
    register_selector,
    select_block,
)


@dataclass
class Kind:
    registry: Registry[Any]
    build: Callable[..., Any]  # the public way to build one entry by name
    known: str  # a built-in name
    valid_params: dict[str, Any]  # parameters that entry accepts


KINDS = {
    "aggregator": Kind(AGGREGATORS, get_aggregator, "gm", {"eps": 1e-5}),
    "selector": Kind(SELECTORS, SELECTORS.build, "topk", {}),
    "memory": Kind(MEMORIES, lambda name, **p: MEMORIES.build(name, dim=4, **p), "mean", {}),
    "quantizer": Kind(QUANTIZERS, QUANTIZERS.build, "qsgd", {"bits": 4}),
    "attack": Kind(ATTACKS, get_attack, "gaussian", {"sigma": 2.0}),
    "omniscient attack": Kind(OMNISCIENT_ATTACKS, get_omniscient_attack, "alie", {"z": 1.0}),
}
ids = list(KINDS)


@pytest.mark.parametrize("kind", ids)
def test_every_kind_uses_the_one_registry_type(kind: str) -> None:
    reg = KINDS[kind].registry
    assert type(reg) is Registry and reg.kind == kind
    assert KINDS[kind].known in reg.names() and reg.names() == sorted(reg)


@pytest.mark.parametrize("kind", ids)
def test_an_unknown_name_is_a_value_error_listing_the_valid_names(kind: str) -> None:
    k = KINDS[kind]
    with pytest.raises(ValueError, match=f"unknown {kind} 'no_such'.*{k.known}"):
        k.build("no_such")


@pytest.mark.parametrize("kind", ids)
def test_an_unknown_parameter_is_a_type_error_naming_it(kind: str) -> None:
    k = KINDS[kind]
    k.build(k.known, **k.valid_params)  # the accepted ones build
    with pytest.raises(TypeError, match=f"{kind} '{k.known}' got unknown parameter.*'bogus_x'"):
        k.build(k.known, bogus_x=1)


def _second_entry(kind: str) -> Any:
    """A valid entry of each kind (registries check what they register)."""
    return {
        "aggregator": AGGREGATORS["mean"],
        "selector": SELECTORS["topk"],
        "memory": MEMORIES["none"],
        "quantizer": QUANTIZERS["sign"],
        "attack": AlieAttack,
        "omniscient attack": OmniscientAlie,
    }[kind]


@pytest.mark.parametrize("kind", ids)
def test_a_taken_name_is_refused_unless_replaced_explicitly(kind: str) -> None:
    reg, name = KINDS[kind].registry, KINDS[kind].known
    original = reg[name]
    with pytest.raises(ValueError, match=f"{kind} '{name}' is already registered"):
        reg.register(name, _second_entry(kind))
    assert reg[name] is original
    reg.register(name, _second_entry(kind), replace=True)
    try:
        assert reg[name] is _second_entry(kind)
    finally:
        reg.register(name, original, replace=True)
    assert reg[name] is original


def test_the_register_functions_refuse_duplicates_too() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("cm", AGGREGATORS["mean"])
    with pytest.raises(ValueError, match="already registered"):
        register_selector("sample", SELECTORS["topk"])
    with pytest.raises(ValueError, match="already registered"):
        register_attack("bit_flip", AlieAttack)
    with pytest.raises(ValueError, match="already registered"):
        register_omniscient_attack("ipm", OmniscientAlie)


def test_attack_registries_refuse_a_class_of_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="subclass of ClientAttack"):
        register_attack("test_wrong", OmniscientAlie)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="subclass of OmniscientAttack"):
        register_omniscient_attack("test_wrong", AlieAttack)  # type: ignore[arg-type]
    assert "test_wrong" not in ATTACKS and "test_wrong" not in OMNISCIENT_ATTACKS


def test_a_user_entry_registers_builds_and_unregisters() -> None:
    def first(s: torch.Tensor, k: int, generator: Any = None, *, offset: int = 0) -> torch.Tensor:
        return torch.arange(offset, offset + k)

    register_selector("test_first", first)
    try:
        assert select_block(torch.ones(2, 6), 3, method="test_first").tolist() == [0, 1, 2]
        bound = SELECTORS.build("test_first", offset=2)
        assert bound(torch.ones(6), 2, None).tolist() == [2, 3]
        with pytest.raises(TypeError, match="'k'"):  # a call argument is not a parameter
            SELECTORS.build("test_first", k=2)
    finally:
        SELECTORS.unregister("test_first")
    assert "test_first" not in SELECTORS


@pytest.mark.parametrize(
    ("build", "old", "new"),
    [
        (lambda: get_aggregator("ctm", beta=0.1), "'beta'", "'trim'"),
        (lambda: get_aggregator("norm_filter", beta=0.1), "'beta'", "'trim'"),
        (lambda: get_attack("nonfinite", fraction=0.5), "'fraction'", "'coord_fraction'"),
    ],
)
def test_a_renamed_parameter_names_its_new_spelling(build, old, new) -> None:
    with pytest.raises(TypeError, match=f"{new} \\(was {old}\\)"):
        build()


def test_the_former_name_of_the_non_finite_attack_names_the_new_one() -> None:
    with pytest.raises(ValueError, match="attack 'nan' was renamed 'nonfinite'"):
        get_attack("nan")
    assert get_attack("nonfinite", coord_fraction=0.5).coord_fraction == 0.5


def test_quantize_dispatches_through_the_registry() -> None:
    with pytest.raises(ValueError, match=r"unknown quantizer 'zip'.*qsgd"):
        quantize(torch.ones(3), method="zip")
    v = torch.tensor([1.0, -2.0, 3.0])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    direct = QUANTIZERS.build("qsgd", bits=4)(v, g1)
    assert torch.equal(direct.data, quantize(v, bits=4, generator=g2).data)


def test_make_memory_builds_from_the_registry() -> None:
    assert type(make_memory("per_client", 4)) is MEMORIES["per_client"]
    with pytest.raises(ValueError, match=r"unknown memory 'lru'.*per_client"):
        make_memory("lru", 4)


def test_a_registry_says_what_a_former_name_or_parameter_is_now():
    from fedbgmd.attacks import ATTACKS
    from fedbgmd.core import AGGREGATORS

    assert ATTACKS.renamed_to("nan") == "nonfinite" and ATTACKS.renamed_to("gaussian") is None
    assert AGGREGATORS.renamed_param("beta") == {"ctm": "trim", "norm_filter": "trim"}
    assert AGGREGATORS.renamed_param("eps") == {}
