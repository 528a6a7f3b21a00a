"""Imports among the project's own modules flow one way: no cycle, not even one that a
function-level import keeps from failing at import time.

The graph is read from the source with ``ast`` (nothing is imported), counting every import
statement wherever it stands (inside functions too), so a lazy import cannot hide a cycle from
this test. Imports under ``if TYPE_CHECKING:`` never run; they are counted too, except in
``provisioning/`` (its policy, fleetview and sizing modules still name each other's types).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "handlers", "provisioning", "klein_facts", "measurement")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(
    path: Path, name: str, modules: dict[str, Path], *, type_checking: bool = True
) -> set[str]:
    """The project modules ``path`` imports: ``from a.b import c`` is ``a.b.c`` when that is a module,
    else ``a.b``; a package's ``__init__`` counts as the package. ``type_checking``: count the
    imports under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree) if type_checking else _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in modules and module != name}


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node, in functions too, except the bodies of ``if TYPE_CHECKING:`` (annotations only:
    never executed, so they cannot make an import fail)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _runtime_nodes(other)
        else:
            yield from _runtime_nodes(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(*, type_checking: bool) -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: imported_modules(path, name, modules, type_checking=type_checking)
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: a depth-first search that meets a module on its own path."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_the_project_modules() -> None:
    graph = import_graph(type_checking=False)
    assert {"worker.runner", "handlers.generate", "provisioning.cli", "klein_facts"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_cycle_even_through_type_only_imports() -> None:
    """Outside provisioning/, not even the imports that only name types close a loop."""
    graph = {
        name: {target for target in targets if not target.startswith("provisioning")}
        for name, targets in import_graph(type_checking=True).items()
        if not name.startswith("provisioning")
    }
    assert {"worker.runner", "handlers.engine_set", "handlers.engines.klein"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_check_sees_a_cycle_a_lazy_import_hides(tmp_path: Path) -> None:
    """The old knot in handlers/: the table imported the handler inside a function, the handler
    imported the table's module at the top. Type-only imports count only when asked for."""
    table = tmp_path / "dispatch.py"
    table.write_text("def table():\n    from handlers.generate import generate\n")
    handler = tmp_path / "generate.py"
    handler.write_text(
        "from typing import TYPE_CHECKING\nfrom handlers.dispatch import Engines\n"
        "if TYPE_CHECKING:\n    from handlers.upscale import upscale\n"
    )
    modules = {name: tmp_path for name in ("handlers.dispatch", "handlers.generate", "handlers.upscale")}
    graph = {
        "handlers.dispatch": imported_modules(table, "handlers.dispatch", modules, type_checking=False),
        "handlers.generate": imported_modules(handler, "handlers.generate", modules, type_checking=False),
        "handlers.upscale": set(),
    }
    assert graph["handlers.generate"] == {"handlers.dispatch"}
    assert imported_modules(handler, "handlers.generate", modules) == {
        "handlers.dispatch",
        "handlers.upscale",
    }
    assert find_cycle(graph) == ["handlers.dispatch", "handlers.generate", "handlers.dispatch"]
