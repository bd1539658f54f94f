"""The import graph of ``plugin/``, ``patches/`` and ``testing/``, drawn from the code (``ast``): what the import-graph
tests assert and ``python -m llamafactory_hera_testing.import_graph`` prints.

Every import counts, at module level or inside a function, and so do ``importlib.import_module("...")`` with a
literal name and a declaration's ``"llamafactory_hera.module:attribute"`` string: what runs, not only what a file's
head shows. An import under ``if TYPE_CHECKING:`` never runs and is no edge (a type a signature names; import-linter's
``exclude_type_checking_imports`` alike). ``top_only=True`` draws what a file's head shows instead (imports at module
level alone).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PLUGIN = "llamafactory_hera"
PATCHES = "llamafactory_hera_patches"
TESTING = "llamafactory_hera_testing"
RUNTIME = f"{PLUGIN}.runtime"  # what the patches may import of the plugin
DECLARED = re.compile(rf"^({PLUGIN}(?:\.\w+)+)(?::\w+)?$")  # "package.module:attribute", imported on first use
Graph = dict[str, set[str]]


def modules(repo: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the three import packages of ``repo``."""
    found = {}
    for base in (repo / "plugin", repo / "patches", repo / "testing"):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _inside_functions(tree: ast.AST) -> set[int]:
    """``id`` of every node inside a function body."""
    return {id(sub) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for sub in ast.walk(node) if sub is not node}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """``id`` of every node under an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block."""
    return {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for statement in node.body for sub in ast.walk(statement)}


def imported_names(module: str, path: Path, top_only: bool = False) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = (_inside_functions(tree) if top_only else set()) | _type_checking_only(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif top_only:
            continue
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DECLARED.match(node.value):
            names.add(DECLARED.match(node.value).group(1))
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def graph(repo: Path, top_only: bool = False) -> tuple[Graph, dict[str, set[str]]]:
    """(module -> the plugin/patches/testing modules it imports, module -> every name it imports)."""
    found = modules(repo)
    imports = {module: imported_names(module, path, top_only) for module, path in found.items()}
    edges: Graph = {}
    for module, names in imports.items():
        targets = set()
        for name in names:
            while name and name not in found:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges, imports


def cycles(edges: Graph) -> list[list[str]]:
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
        for other in edges[node]:
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def closure(edges: Graph, *starts: str) -> set[str]:
    """``starts`` and every module they import, transitively."""
    todo, seen = list(starts), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def folder(module: str) -> str:
    """The plugin folder (or top-level module) ``module`` lives in: ``llamafactory_hera.hera.loss`` -> ``hera``."""
    return module.split(".")[1] if module.count(".") else module


def folder_graph(edges: Graph) -> Graph:
    """Which plugin folder imports which (the package's face, its ``__init__``, is no folder)."""
    folders: Graph = {}
    for module, targets in edges.items():
        if within(module, PLUGIN) and module != PLUGIN:
            folders.setdefault(folder(module), set()).update(
                folder(other) for other in targets
                if within(other, PLUGIN) and other != PLUGIN and folder(other) != folder(module))
    return {name: targets & set(folders) for name, targets in folders.items()}


def lazy_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, says why) of each import inside a function of ``path``: why is a ``# lazy: <why>`` on it, or in the
    comment above it or above the group of imports it is in."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    inside = _inside_functions(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) in inside:
            above = node.lineno - 2
            while above >= 0 and re.match(r"\s*(from|import) ", lines[above]):
                above -= 1
            comment = []
            while above >= 0 and lines[above].strip().startswith("#"):
                comment.append(lines[above])
                above -= 1
            said = " ".join(lines[node.lineno - 1:node.end_lineno] + comment)
            found.append((node.lineno, "# lazy" in said))
    return sorted(found)


ENTRIES = ("hera.trainer", "hera.workflow", "rah.workflow", "harc.trainer", "harc.workflow")
# the most files a reader of a method's trainer / workflow must load (the trainer holds the step); a workflow's
# include selection's memory plan (placement.py) and the host's key table that the one key reader consults for
# booleans (recipe/host_arguments.py); HeRA's trainer its capture (hera/capture.py: the heads' inputs, and their
# weights read in the modules' calls under ZeRO-3) beside the projection; a module raises RecipeError from where it is
# defined (runtime/errors.py), not through the one-line report's module (job_refusal.py); a
# trainer the sections it tells its watchdog (training/sections.py), which time the passes, steps and saves, and the
# save signal noted from the stage's start (runtime/save_signal.py), which the passes before step 1 stop on; a
# workflow the watchdog itself (training/watchdog.py: its bounds, its monitor's judgement, the job's store keys it
# shares with the launcher, nvidia-resiliency-ext's reporter) and its placement the quantized bytes a weight takes
# (recipe/quantization.py, torch-free: plan reads it too); HeRA's trainer its per-log sums (hera/step_sums.py: the
# values its step keeps and sums at the logging read), apart from the step, which keeps it under 400 lines; a
# workflow the trainer base (training/trainer_base.py: a run's order around the steps, with the checkpoints' and the
# resumed weights' helpers apart, each under 400 lines) and the host's trainer class it composes HeRA's over
# (patches' sft_classes.py); HeRA's preparation, head selection with it, is a phase of its own (hera/preparation.py),
# and what HeRA saves beside a checkpoint the workflow's class's hooks (hera/saved_state.py), not the step's
TRAINER_FILES = 20
WORKFLOW_FILES = 45
# the most imports inside functions in the plugin and the patches: each is lazy for a reason its line says (start-up,
# a one-line error before torch, an optional extra); any other import sits at its module's top
INNER_IMPORTS = 200
# the package's size in non-blank characters (a line's indentation included, its end not), and their mean a non-blank
# line: met by removing code, never by packing it
PACKAGE_CHARACTERS = 1_330_000
CHARACTERS_A_LINE = 55


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def reach(edges: Graph, found: dict[str, Path], entry: str) -> set[str]:
    """The plugin's and the patches' files that ``entry`` (``hera.trainer``) reaches through its imports and
    declarations, itself included; a package's face (its ``__init__.py``) is no file of its own here."""
    return {module for module in closure(edges, f"{PLUGIN}.{entry}")
            if (within(module, PLUGIN) or within(module, PATCHES)) and found[module].name != "__init__.py"}


def import_counts(repo: Path) -> tuple[int, int]:
    """(import statements, those inside functions) of the package users install (plugin and patches)."""
    statements = inside = 0
    for module, path in modules(repo).items():
        if within(module, PLUGIN) or within(module, PATCHES):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            lazy = _inside_functions(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    statements += 1
                    inside += id(node) in lazy
    return statements, inside


def package_size(repo: Path) -> tuple[int, int]:
    """(non-blank characters, non-blank lines) of the package users install (plugin and patches)."""
    characters = lines = 0
    for module, path in modules(repo).items():
        if within(module, PLUGIN) or within(module, PATCHES):
            filled = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            characters += sum(len(line) for line in filled)
            lines += len(filled)
    return characters, lines


def house(repo: Path) -> str:
    """The measures of the plugin's house as text: each run's import closure (the plugin's files and lines it imports,
    counted from the file heads alone and with lazy imports and declarations), imports inside functions, cycles, the
    folders with their files and lines."""
    found = modules(repo)
    full, _ = graph(repo)
    heads, _ = graph(repo, top_only=True)
    plugin = {module for module in found if within(module, PLUGIN)}
    out = ["run closures (plugin and patches files / lines, package faces not counted): file heads only | with lazy "
           f"imports and declarations (at most {TRAINER_FILES} for a trainer, {WORKFLOW_FILES} for a workflow)"]
    for entry in ENTRIES:
        row = []
        for edges in (heads, full):
            reached = reach(edges, found, entry)
            row.append(f"{len(reached)} / {sum(_lines(found[m]) for m in reached)}")
        out.append(f"  {entry}: {row[0]} | {row[1]}")
    statements, inside = import_counts(repo)
    out.append(f"import statements (plugin and patches): {statements}, inside functions: {inside} (at most "
               f"{INNER_IMPORTS})")
    characters, lines = package_size(repo)
    out.append(f"non-blank characters (plugin and patches): {characters:,} (at most {PACKAGE_CHARACTERS:,}), "
               f"{characters / lines:.1f} a line (at most {CHARACTERS_A_LINE})")
    out.append(f"module cycles: {len(cycles(full))}; folder cycles: {len(cycles(folder_graph(full)))}")
    folders: dict[str, list[int]] = {}
    for module in plugin:
        if module != PLUGIN:
            folders.setdefault(folder(module), []).append(_lines(found[module]))
    out.append(f"package: {len(plugin)} modules, {sum(sum(v) for v in folders.values()) + _lines(found[PLUGIN])} lines")
    out.extend(f"  {name}: {len(sizes)} files, {sum(sizes)} lines" for name, sizes in sorted(folders.items()))
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(house(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()))
