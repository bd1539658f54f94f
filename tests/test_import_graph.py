"""One door to the host: the import graph of ``plugin/``, ``patches/`` and ``testing/``, drawn from the code (``ast``).

Every import counts, at module level or inside a function, and so do ``importlib.import_module("...")`` with a
literal name and a declaration's ``"llamafactory_hera.module:attribute"`` string (what runs, not only what a file's head
shows). Asserted: no import cycle among the plugin's, the patches' and the test support's modules, and none among the
plugin's folders (no import runs back up); a lazy import on a run's path says why it is lazy; of the
package users install (plugin and patches), only ``llamafactory_hera_patches`` modules import ``llamafactory`` (the
test support, ``llamafactory_hera_testing``, may); no patches module imports ``llamafactory_hera`` (the patches learn
the methods by registration, :mod:`llamafactory_hera_patches.registry`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PLUGIN, PATCHES, TESTING = "llamafactory_hera", "llamafactory_hera_patches", "llamafactory_hera_testing"
DECLARED = re.compile(rf"^({PLUGIN}(?:\.\w+)+)(?::\w+)?$")  # "package.module:attribute", imported on first use


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
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DECLARED.match(node.value):
            names.add(DECLARED.match(node.value).group(1))
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


def _folder(module: str) -> str:
    """The plugin folder (or top-level module) ``module`` lives in: ``llamafactory_hera.hera.loss`` -> ``hera``."""
    return module.split(".")[1] if module.count(".") else module


def test_a_declarations_string_is_an_edge() -> None:
    graph, _ = _graph()
    assert f"{PLUGIN}.hera.workflow" in graph[f"{PLUGIN}.methods"]


def test_no_import_runs_back_up_between_the_plugins_folders() -> None:
    """Folders as rooms: the graph of which folder imports which has no cycle (the package's face, its __init__,
    is no folder)."""
    graph, _ = _graph()
    folders: dict[str, set[str]] = {}
    for module, edges in graph.items():
        if not _within(module, PLUGIN) or module == PLUGIN:
            continue
        folders.setdefault(_folder(module), set()).update(
            _folder(other) for other in edges
            if _within(other, PLUGIN) and other != PLUGIN and _folder(other) != _folder(module))
    assert _cycles({folder: folders.get(folder, set()) & set(folders) for folder in folders}) == []


def _lazy_imports_without_a_reason(path: Path) -> list[int]:
    """Lines of the imports inside functions of ``path`` with no ``# lazy: <why>`` on them, or on the line above them
    or above the group they open."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    inside = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
              for sub in ast.walk(node) if sub is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) in inside:
            above = node.lineno - 2
            while above >= 0 and re.match(r"\s*(from|import) ", lines[above]):
                above -= 1
            said = " ".join(lines[node.lineno - 1:node.end_lineno]) + (lines[above] if above >= 0 else "")
            if "# lazy" not in said:
                found.append(node.lineno)
    return found


def test_every_lazy_import_on_a_runs_path_says_why() -> None:
    """From each declared method's parts (its run, checks, arguments), every module a run imports: an import inside a
    function there is lazy for a reason it states (start-up, an optional extra), or it sits at the top."""
    graph, _ = _graph()
    modules = _modules()
    todo, seen = [name for name in graph[f"{PLUGIN}.methods"]], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    assert {f"{PLUGIN}.hera.trainer", f"{PLUGIN}.rah.calibrate", f"{PLUGIN}.harc.state"} <= seen
    offenders = {module: lines for module in sorted(seen) if not _within(module, TESTING)
                 for lines in [_lazy_imports_without_a_reason(modules[module])] if lines}
    assert offenders == {}
