"""The layering rules of DESIGN.md, read from the source: which modules may import flwr / hydra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    *sorted((ROOT / "fedbgmd" / "core").glob("*.py")),
    *[
        ROOT / "fedbgmd" / f"{m}.py"
        for m in ("data", "models", "training", "results", "report", "plots")
    ],
    *sorted((ROOT / "attacks").glob("*.py")),
]
HYDRA_OK = {ROOT / "fedbgmd" / "config.py", ROOT / "fedbgmd" / "cli.py"}
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


def test_core_imports_only_torch_and_the_standard_library():
    allowed = {"torch", "fedbgmd", "__future__"}
    # the one exception: numpy's partition, the CPU kernel of the coordinate-wise median
    exceptions = {"coordinatewise.py": {"numpy"}}
    import sys

    for path in sorted((ROOT / "fedbgmd" / "core").glob("*.py")):
        ok = allowed | exceptions.get(path.name, set())
        extra = {
            r for r in imported_roots(path) if r not in ok and r not in sys.stdlib_module_names
        }
        assert not extra, f"{path.name} imports {extra}"
