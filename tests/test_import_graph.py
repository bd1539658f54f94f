"""One door to the host: the import graph of ``plugin/``, ``patches/`` and ``testing/``, drawn from the code (``ast``).

Every import counts, at module level or inside a function, and so does ``importlib.import_module("...")`` with a
literal name. Asserted: no import cycle among the plugin's, the patches' and the test support's modules; of the
package users install (plugin and patches), only ``llamafactory_hera_patches`` modules import ``llamafactory`` (the
test support, ``llamafactory_hera_testing``, may); no patches module imports ``llamafactory_hera`` (the patches learn
the methods by registration, :mod:`llamafactory_hera_patches.registry`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PLUGIN, PATCHES, TESTING = "llamafactory_hera", "llamafactory_hera_patches", "llamafactory_hera_testing"


def _modules() -> dict[str, Path]:
    modules = {}
    for base in (REPO / "plugin", REPO / "patches", REPO / "testing"):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the plugin/patches/testing modules it imports, module -> every name it imports)."""
    modules = _modules()
    imports = {module: _imported_names(module, path) for module, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for module, names in imports.items():
        edges = set()
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph, imports


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_drawn_from_the_three_packages() -> None:
    graph, _ = _graph()
    assert f"{PLUGIN}.methods" in graph and f"{PATCHES}.stage" in graph and f"{PATCHES}.registry" in graph
    assert f"{PLUGIN}.demo.hera" in graph[f"{TESTING}.recipes"]  # an import inside a function
    assert f"{PATCHES}.registry" in graph[f"{PLUGIN}._bootstrap"]


def test_no_import_cycle() -> None:
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_patches_import_llamafactory() -> None:
    _, imports = _graph()
    importers = sorted(module for module, names in imports.items() if any(_within(n, "llamafactory") for n in names))
    assert f"{TESTING}.accelerator" in importers  # the test support's imports are read too
    package = [module for module in importers if not _within(module, TESTING)]
    assert package and all(_within(module, PATCHES) for module in package), package


def test_the_patches_do_not_import_the_plugin() -> None:
    _, imports = _graph()
    offenders = {module: sorted(n for n in names if _within(n, PLUGIN))
                 for module, names in imports.items() if _within(module, PATCHES)}
    assert {module: names for module, names in offenders.items() if names} == {}
