"""One door to the host: the import graph of ``plugin/``, ``patches/`` and ``testing/``, drawn from the code
(:mod:`llamafactory_hera_testing.import_graph`).

Every import counts, at module level or inside a function, and so do ``importlib.import_module("...")`` with a
literal name and a declaration's ``"llamafactory_hera.module:attribute"`` string (what runs, not only what a file's head
shows). Asserted: no import cycle among the plugin's, the patches' and the test support's modules, and none among the
plugin's folders (no import runs back up); a lazy import on a run's path says why it is lazy; of the
package users install (plugin and patches), only ``llamafactory_hera_patches`` modules import ``llamafactory`` (the
test support, ``llamafactory_hera_testing``, may); no patches module imports ``llamafactory_hera`` (the patches learn
the methods by registration, :mod:`llamafactory_hera.runtime.registry`).
"""

from __future__ import annotations

from conftest import REPO
from llamafactory_hera_testing.import_graph import (
    CHARACTERS_A_LINE,
    ENTRIES,
    INNER_IMPORTS,
    PACKAGE_CHARACTERS,
    PATCHES,
    PLUGIN,
    RUNTIME,
    TESTING,
    TRAINER_FILES,
    WORKFLOW_FILES,
    closure,
    cycles,
    folder_graph,
    graph,
    import_counts,
    imported_names,
    lazy_imports,
    modules,
    package_size,
    reach,
    within,
)


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return graph(REPO)




def test_the_graph_is_drawn_from_the_three_packages() -> None:
    graph, _ = _graph()
    assert f"{PLUGIN}.methods" in graph and f"{PATCHES}.stage" in graph and f"{RUNTIME}.registry" in graph
    assert f"{PLUGIN}.demo.hera" in graph[f"{TESTING}.recipes"]  # an import inside a function
    assert f"{RUNTIME}.registry" in graph[f"{PLUGIN}._bootstrap"]


def test_no_import_cycle() -> None:
    graph, _ = _graph()
    assert cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_patches_import_llamafactory() -> None:
    _, imports = _graph()
    importers = sorted(module for module, names in imports.items() if any(within(n, "llamafactory") for n in names))
    assert f"{TESTING}.accelerator_run" in importers  # the test support's imports are read too
    package = [module for module in importers if not within(module, TESTING)]
    assert package and all(within(module, PATCHES) for module in package), package


def test_the_patches_import_of_the_plugin_its_runtime_alone() -> None:
    _, imports = _graph()
    offenders = {module: sorted(n for n in names if within(n, PLUGIN) and not within(n, RUNTIME))
                 for module, names in imports.items() if within(module, PATCHES)}
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_runtime_imports_neither_the_host_nor_the_patches_nor_the_rest_of_the_plugin() -> None:
    """Below the patches and the methods alike: the package's face (its version) aside, nothing of theirs."""
    _, imports = _graph()
    runtime = {module: names for module, names in imports.items() if within(module, RUNTIME)}
    assert f"{RUNTIME}.run_claim" in runtime and f"{RUNTIME}.errors" in runtime
    offenders = {module: sorted(n for n in names if within(n, "llamafactory") or within(n, PATCHES)
                                or within(n, PLUGIN) and not within(n, RUNTIME) and n != f"{PLUGIN}.__version__"
                                and n != PLUGIN)
                 for module, names in runtime.items()}
    assert {module: names for module, names in offenders.items() if names} == {}


def test_a_declarations_checks_and_phases_are_edges_that_reach_the_workflow() -> None:
    graph, _ = _graph()
    assert {f"{PLUGIN}.hera.raw_checks", f"{PLUGIN}.hera.parsed_checks"} <= graph[f"{PLUGIN}.methods"]
    assert f"{PLUGIN}.hera.workflow" in graph[f"{PLUGIN}.methods"]  # its phases' module, imported as a phase runs


def test_no_import_runs_back_up_between_the_plugins_folders() -> None:
    """Folders as rooms: the graph of which folder imports which has no cycle."""
    graph, _ = _graph()
    folders = folder_graph(graph)
    assert {"hera", "recipe", "heads", "board", "methods"} <= set(folders)
    assert cycles(folders) == []


def test_every_lazy_import_on_a_runs_path_says_why() -> None:
    """From each declared method's parts (its run, checks, arguments, panel, verbs), every module they import: an
    import inside a function there is lazy for a reason it states (start-up, an optional extra), or it sits at the
    top."""
    graph, _ = _graph()
    reached = closure(graph, *graph[f"{PLUGIN}.methods"])
    assert {f"{PLUGIN}.hera.trainer", f"{PLUGIN}.rah.calibrate", f"{PLUGIN}.harc.state"} <= reached
    found = modules(REPO)
    offenders = {module: lines for module in sorted(reached) if not within(module, TESTING)
                 for lines in [[line for line, why in lazy_imports(found[module]) if not why]] if lines}
    assert offenders == {}


def test_a_trainer_holds_its_step_and_a_workflow_wires_the_rest() -> None:
    """What a reader of a method's trainer must load is its step (the plugin's and the patches' files its imports and
    declarations reach, package faces aside): at most ``TRAINER_FILES``; a workflow, which wires the monitor, the run
    summary, plots and the checks before the first step around it, at most ``WORKFLOW_FILES``."""
    graph, _ = _graph()
    found = modules(REPO)
    sizes = {entry: len(reach(graph, found, entry)) for entry in ENTRIES}
    assert sizes["hera.trainer"] <= TRAINER_FILES and sizes["harc.trainer"] <= TRAINER_FILES, sizes
    assert all(sizes[entry] <= WORKFLOW_FILES for entry in ENTRIES if entry.endswith("workflow")), sizes
    assert f"{PLUGIN}.hera.loss" in reach(graph, found, "hera.trainer")  # the measure reaches what the step needs
    assert f"{PLUGIN}.hera.monitor" not in reach(graph, found, "hera.trainer")


def test_an_import_for_type_checking_alone_is_no_edge(tmp_path) -> None:
    """It never runs: a signature's type is no file a reader of the step must load."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nimport a\nif TYPE_CHECKING:\n    import b\n", encoding="utf-8")
    assert imported_names("mod", path) == {"typing", "typing.TYPE_CHECKING", "a"}


def test_imports_inside_functions_stay_within_their_budget_and_say_why() -> None:
    """An import inside a function is lazy for a reason its line says (start-up, a one-line error before torch, an
    optional extra): at most ``INNER_IMPORTS`` in the plugin and the patches; the rest sit at their module's top."""
    statements, inside = import_counts(REPO)
    assert statements > 1000  # the count reaches the package
    assert inside <= INNER_IMPORTS, inside
    offenders = {module: lines for module, path in modules(REPO).items() if not within(module, TESTING)
                 for lines in [[line for line, why in lazy_imports(path) if not why]] if lines}
    assert offenders == {}


def test_the_package_stays_within_its_size() -> None:
    """The package users install (plugin and patches) in non-blank characters, and their mean a line: a budget met by
    removing code, never by packing lines (a packed line raises the mean)."""
    characters, lines = package_size(REPO)
    assert lines > 20_000  # the count reaches the package
    assert characters <= PACKAGE_CHARACTERS, characters
    assert characters / lines <= CHARACTERS_A_LINE, characters / lines
