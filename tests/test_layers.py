"""The package's import layers stay in place: a module imports only from its own layer or below
(DEVELOPERS.md draws them). Read from the source with ``ast``; imports under ``TYPE_CHECKING``
are annotations, not dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evit_patch"

LAYERS = [
    {"errors", "checks", "opaque", "options", "version"},
    {"reductions", "scores", "token_state"},
    {"config"},
    {"families"},
    {"graph"},
    {"planning"},
    {"pipeline"},
    {"deploy", "analysis", "bench"},
    {"train"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]
"""Bottom to top; a name is a module or a sub-package of ``evit_patch``."""

ALLOWED_UPWARD = {("planning.objective", "pipeline")}
"""Deliberate exceptions, each imported inside a function: searched plans are compared on patched models."""


def _layer(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def _unit(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[str]:
    """``evit_patch``-relative module names ``path`` imports (``graph.locate``), TYPE_CHECKING blocks skipped."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                found += [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
            elif node.module and node.module.startswith("evit_patch"):
                found.append(node.module.removeprefix("evit_patch").strip("."))
        elif isinstance(node, ast.Import):
            found += [
                a.name.removeprefix("evit_patch").strip(".") for a in node.names if a.name.startswith("evit_patch")
            ]
    return [f for f in found if f]


def test_every_module_has_a_layer():
    units = {_unit(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for target in _imports(path):
            if _layer(_unit(target)) > _layer(_unit(module)) and (module, _unit(target)) not in ALLOWED_UPWARD:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_allowed_exception_is_imported_inside_a_function():
    tree = ast.parse((PACKAGE / "planning" / "objective.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "pipeline"]
    assert top == []
