"""The package layout: one wing per pipeline stage, imports running one way.

Each module of `lowrank_fx` belongs to a wing (its first folder, or itself at the top level).
A module may import from its own wing or from a wing of lower rank, never upward or across
wings of equal rank, and this holds for function-level imports too, so none of them hides a
cycle. The module-level import graph has no cycles.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import lowrank_fx

PACKAGE = pathlib.Path(lowrank_fx.__file__).parent

# Lowest first. A wing may use any wing of lower rank.
RANK = {
    "errors": 0, "version": 0, "logs": 0, "noise": 0, "deprecation": 0,
    "progress": 1, "options": 1,  # progress writes through logs
    "graph": 2,
    "methods": 3,
    "spec": 4,
    "passes": 5,
    "adapt": 6,
    "files": 7,
    "training": 8, "export": 8,
    "generation": 9,  # decode graphs, generate, generation export and sessions: above export
    "__init__": 10,  # the public API
    "cli": 11,
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(["lowrank_fx", *parts])
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported lowrank_fx module, at module level?) for every import statement in `module` that
    runs (imports under `if TYPE_CHECKING:` are for the type checker only and never run)."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(node) for node in tree.body}
    type_only = {id(inner) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for statement in node.body for inner in ast.walk(statement)}
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        for name in names:
            if name == "lowrank_fx" or name.startswith("lowrank_fx."):
                while name not in MODULES:
                    name = name.rpartition(".")[0]
                found.append((name, id(node) in top_level))
    return found


def test_every_module_has_a_wing_and_imports():
    for module in MODULES:
        assert _wing(module) in RANK, f"{module} is in no known wing; add its wing to RANK with its rank"
        importlib.import_module(module if not module.endswith("__main__") else module.rpartition(".")[0])


def test_imports_run_one_way():
    wrong = []
    for module in MODULES:
        wing = _wing(module)
        for imported, _ in _imports(module):
            other = _wing(imported)
            if other != wing and RANK[other] >= RANK[wing]:
                wrong.append(f"{module} imports {imported} ({wing} may not use {other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {m: {i for i, top in _imports(m) if top and i != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        state[m] = 1
        for n in sorted(edges[m]):
            visit(n, [*path, m])
        state[m] = 2

    for m in sorted(MODULES):
        visit(m, [])


def test_wing_packages_say_what_they_hold():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module.count(".") == 1 and _wing(module) in RANK:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and "Read `" in doc, f"{path} should open with what the wing does and which module to read first"
