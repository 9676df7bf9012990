"""The layering rules of DESIGN.md: which modules may import flwr / hydra, read from the source
and checked in a fresh interpreter per layer; no import cycles."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    *sorted((ROOT / "fedbgmd" / "core").glob("*.py")),
    *[
        ROOT / "fedbgmd" / f"{m}.py"
        for m in ("data", "partitions", "models", "training", "plugins", "seeding", "workload")
    ],
    *sorted((ROOT / "fedbgmd" / "reporting").glob("*.py")),
    *sorted((ROOT / "attacks").glob("*.py")),
]
# config and CLI compose with Hydra; fused/launcher.py *is* a Hydra plugin (hydra/launcher=fused)
HYDRA_OK = {
    ROOT / "fedbgmd" / "config.py",
    ROOT / "fedbgmd" / "cli.py",
    ROOT / "fedbgmd" / "fused" / "launcher.py",
}
ALL_SOURCES = [
    p
    for folder in ("fedbgmd", "strategies", "clients", "attacks", "benchmarks", "docs")
    for p in sorted((ROOT / folder).rglob("*.py"))
]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_layers_import_neither_flwr_nor_hydra(path):
    assert not imported_roots(path) & {"flwr", "hydra", "omegaconf"}


@pytest.mark.parametrize("path", ALL_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_config_and_cli_import_hydra_and_nothing_imports_the_bare_folders(path):
    roots = imported_roots(path)
    assert not roots & {"strategies", "clients", "attacks", "conf"}
    if path not in HYDRA_OK:
        assert "hydra" not in roots


def test_core_imports_only_torch_its_own_modules_and_the_standard_library():
    # The one exception: numpy's partition is the CPU selection kernel of the coordinate-wise
    # median (6x faster than torch's kthvalue/topk there, same values); no other numpy in core.
    exceptions = {"coordinatewise.py": {"numpy"}}
    allowed = {"torch", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "fedbgmd" / "core").glob("*.py")):
        ok = allowed | exceptions.get(path.name, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                # core may import itself (fedbgmd.core...), nothing else of fedbgmd
                if name == "fedbgmd.core" or name.startswith("fedbgmd.core."):
                    continue
                assert name.split(".")[0] in ok, f"{path.name} imports {name}"


# ------------------------------------------------------------------ what each layer loads, for real
# The AST checks above see one file's own imports; these import each layer in a fresh interpreter
# and read sys.modules, so an import two modules away (strategies -> plugins -> config -> hydra)
# counts too.
def loaded_after(module: str) -> set[str]:
    """Top-level names in sys.modules after importing ``module`` in a fresh interpreter, minus
    those the bare interpreter has already."""
    code = (
        f"import json, sys; before = set(sys.modules); import {module}; "
        "print(json.dumps(sorted({k for k in sys.modules if k not in before})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@functools.cache
def torch_modules() -> frozenset[str]:
    return frozenset(loaded_after("torch"))


def test_core_loads_torch_and_nothing_else_but_the_numpy_exception():
    extra = loaded_after("fedbgmd.core") - torch_modules()
    foreign = {m for m in extra if m.split(".")[0] not in {"fedbgmd", "numpy"}}
    assert not foreign, sorted(foreign)
    ours = {m for m in extra if m.startswith("fedbgmd.")}
    assert ours <= {"fedbgmd.core"} | {m for m in ours if m.startswith("fedbgmd.core.")}, ours


PURE_LAYERS = ["fedbgmd.attacks", "fedbgmd.data", "fedbgmd.models", "fedbgmd.training"]
# (plugins, seeding, workload and wire load with these)
FLOWER_SIDE = [
    "fedbgmd.strategies",
    "fedbgmd.clients.honest",
    "fedbgmd.engine",
    "fedbgmd.server",
    "fedbgmd.deploy",
    "fedbgmd.fused",
    "fedbgmd.runner",
    "fedbgmd.config",  # the schemas are plain dataclasses; Hydra loads only to compose
]


@pytest.mark.parametrize("module", PURE_LAYERS)
def test_pure_layers_load_neither_flwr_nor_hydra(module):
    roots = {m.split(".")[0] for m in loaded_after(module)}
    assert not roots & {"flwr", "hydra", "omegaconf"}, module


@pytest.mark.parametrize("module", FLOWER_SIDE)
def test_flower_side_layers_load_no_hydra_or_omegaconf(module):
    roots = {m.split(".")[0] for m in loaded_after(module)}
    assert not roots & {"hydra", "omegaconf"}, module


def test_the_cli_loads_hydra():  # the check above would pass vacuously if nothing ever did
    assert {"hydra", "omegaconf"} <= {m.split(".")[0] for m in loaded_after("fedbgmd.cli")}


# ------------------------------------------------------------------------------ no import cycles
# A unit is a top-level module of fedbgmd or one whole sub-package (the lazy built-in loaders of
# a registry import within their own package). Every import counts, also one inside a function:
# the strategies <-> components circle of issue 20 was one.
SUBPACKAGES = {
    ROOT / "fedbgmd" / "core": "fedbgmd.core",
    ROOT / "strategies": "fedbgmd.strategies",
    ROOT / "clients": "fedbgmd.clients",
    ROOT / "attacks": "fedbgmd.attacks",
}


def import_graph() -> dict[str, set[str]]:
    units = {
        p: f"fedbgmd.{p.stem}" for p in (ROOT / "fedbgmd").glob("*.py") if p.stem != "__init__"
    }
    for folder, name in SUBPACKAGES.items():
        units.update({p: name for p in folder.glob("*.py")})
    names = set(units.values())

    def unit_of(module: str) -> str | None:
        parts = module.split(".")
        for i in range(len(parts), 1, -1):
            if ".".join(parts[:i]) in names:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {n: set() for n in names}
    for path, unit in units.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for m in modules:
                target = unit_of(m) if m.startswith("fedbgmd.") else None
                if target is not None and target != unit:
                    graph[unit].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles_between_modules_and_subpackages():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_one():  # a check that cannot fail is no check
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "fedbgmd.plugins" in graph["fedbgmd.strategies"]  # the graph sees real imports
