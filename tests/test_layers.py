"""Imports point one way: scripts -> engine -> data / models -> ops, with utils.config and utils.log beneath all."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "predict", "get_map", "summary", "study"}
FOUNDATION = {"utils.config", "utils.settings", "utils.log"}
# layer of a module -> the layers it may import (its own included)
ALLOWED = {
    "foundation": {"foundation"},
    "ops": {"foundation", "ops"},
    "data": {"foundation", "ops", "data"},
    "models": {"foundation", "ops", "models"},
    "engine": {"foundation", "ops", "data", "models", "engine"},
    "cli": {"foundation", "cli"},
    # command-line tools run as modules (python -m utils.tools.NAME): scripts that live inside the package
    "scripts": {"foundation", "ops", "data", "models", "engine", "cli", "scripts"},
}


def layer(module: str) -> str | None:
    """The layer of a project module name; None for anything outside the project."""
    if module in FOUNDATION:
        return "foundation"
    if module == "utils.cli":
        return "cli"
    if module == "yolo" or module.startswith(("utils.engine", "utils.study")):
        return "engine"
    if module.startswith("utils.ops"):
        return "ops"
    if module.startswith("utils.data"):
        return "data"
    if module == "nets" or module.startswith("nets."):
        return "models"
    if module in SCRIPTS or module.startswith("utils.tools"):
        return "scripts"
    return None


def project_imports(path: Path) -> set[str]:
    """Project modules a file imports (at any depth of the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if layer(f"{node.module}.{a.name}")}
    return {m for m in found if layer(m)}


def library_files() -> list[Path]:
    return sorted([ROOT / "yolo.py", *ROOT.glob("utils/**/*.py"), *ROOT.glob("nets/**/*.py")])


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_point_down(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    own = layer(module)
    bad = {m: layer(m) for m in project_imports(path) if layer(m) not in ALLOWED[own]}
    assert not bad, f"{module} ({own}) imports {bad}"


def test_the_layers_cover_every_library_module():
    for path in library_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        assert module == "utils" or layer(module) in ALLOWED, module
