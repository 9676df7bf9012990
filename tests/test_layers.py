"""The layering rules of DESIGN.md, read from the source: which modules may import flwr / hydra."""

from __future__ import annotations

import ast
import sys
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
