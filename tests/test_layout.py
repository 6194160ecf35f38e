"""The layout of src/vitcli: no import cycles (type-only and function-level imports included), no module
over 400 lines, no private name imported across modules, and nothing in the core imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vitcli"
MAX_LINES = 400
ENTRY_POINTS = {"vitcli.__main__"}  # may import the CLI: it is how `python -m vitcli` starts it


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import anywhere in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def edges() -> dict[str, set[str]]:
    """Every vitcli module -> the vitcli modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, item, _ in imported_names(tree, name, path.name == "__init__.py"):
            target = f"{base}.{item}" if item and f"{base}.{item}" in MODULES else base
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_no_false_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_function_level_and_type_only_imports():
    graph = edges()
    assert "vitcli.models.folders" in graph["vitcli.finetune.rundir"]  # imported inside a function there
    assert len(graph) > 50


def test_no_import_cycles_including_type_only_and_function_level_imports():
    assert cycles(edges()) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_400_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES, f"{MODULES[name]}: split it by responsibility"


def test_no_private_name_is_imported_across_modules():
    offences = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(), str(path))
        imported_modules = {}  # local alias -> vitcli module, for `module._private` uses
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offences.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        imported_modules[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        imported_modules[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported_modules):
                offences.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert offences == []


def test_nothing_in_the_core_imports_the_cli():
    graph = edges()
    core = [name for name in graph if not name.startswith("vitcli.cli") and name not in ENTRY_POINTS]
    assert [(name, sorted(t for t in graph[name] if t.startswith("vitcli.cli"))) for name in core
            if any(t.startswith("vitcli.cli") for t in graph[name])] == []


def test_torchrun_environment_is_read_in_distributed_only():
    """One reading of RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE: ``distributed.torchrun_rank``."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    readers = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names and name != "vitcli.distributed":
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value}")
    assert readers == []
