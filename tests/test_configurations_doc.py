"""docs/configurations.md's method x configuration grid: every pair has a short
cell, "runs", "refused: why" or "no test", each cell other than "runs" cites a note the page has, every "runs" cell
has its test under "Tests" (and only those cells), and every test the page names is a test function of its file (a
parametrized id in brackets is allowed). No model, no run."""

from __future__ import annotations

import ast
import re

from conftest import REPO
from markdown_docs import read, section

PAGE = "docs/configurations.md"
METHODS = ("HeRA", "HARC", "RAH-LoRA")
CONFIGURATIONS = ("LoRA", "full", "freeze", "QLoRA 4-bit", "QLoRA 8-bit", "checkpoint saved quantized",
                  "GPTQ, AWQ, HQQ, ...", "DoRA", "DoRA + QLoRA", "DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 + QLoRA",
                  "ZeRO-3 + DoRA", "FSDP2 LoRA", "FSDP2 full", "FSDP2 bf16", "FSDP2 CPU offload", "FSDP2 + QLoRA",
                  "FSDP2 + QLoRA, efficient loading", "FSDP2 + QLoRA 8-bit", "FSDP2 + QLoRA, codes in another dtype",
                  "FSDP2 sharded state dict", "FSDP1", "FSDP1 + QLoRA (LLaMA-Factory's example)", "recipe's `fsdp` key",
                  "packing", "streaming", "`torch_compile`", "`enable_liger_kernel`", "`use_hyper_parallel`",
                  "`USE_MEGATRON_BRIDGE=1` (main)", "`USE_MCA=1` (Megatron-Core)", "`use_kt` (KTransformers)",
                  "`use_unsloth`", "v1 (`USE_V1=1`, a v1 trainer run)")
CELL = re.compile(r"^(runs( \(N\d+\))?|refused: [^()|]+ \(N\d+\)|no test(: [^()|]+)? \(N\d+\))$")
LABEL_LIMIT, CELL_LIMIT = 40, 50  # read in a minute: a row is a few words, the conditions are in the notes
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`")
TESTED = re.compile(rf"({'|'.join(METHODS)}) (`[^`]+`)")


def _table() -> dict[str, dict[str, str]]:
    """configuration (the first cell) -> method -> cell."""
    rows = [line for line in read(PAGE).splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(header), row
        table[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def _tests() -> dict[str, dict[str, str]]:
    """The "Tests" list: configuration -> method -> the node id that runs it."""
    listed = {}
    for line in section(read(PAGE), "Tests").splitlines():
        if line.startswith("- "):
            label, _, rest = line[2:].partition(": ")
            assert label not in listed, f"{label} is listed twice under Tests"
            listed[label] = {method: node for method, node in TESTED.findall(rest)}
            assert len(listed[label]) == rest.count("`") // 2, line  # one test per method, each named once
    return listed


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_method_and_configuration_has_a_short_cell_of_a_known_form() -> None:
    table = _table()
    assert list(table) == list(CONFIGURATIONS), list(table)
    for configuration, cells in table.items():
        assert len(configuration) <= LABEL_LIMIT, configuration
        assert list(cells) == list(METHODS), (configuration, list(cells))
        for method, cell in cells.items():
            assert CELL.match(cell) and len(cell) <= CELL_LIMIT, (configuration, method, cell)
    notes = set(re.findall(r"^- (N\d+)\. ", read(PAGE), flags=re.M))
    cited = {note for cells in table.values() for cell in cells.values() for note in re.findall(r"\((N\d+)\)", cell)}
    assert cited <= notes, f"cells cite notes {sorted(cited - notes)} that {PAGE} does not have"
    assert notes <= cited, f"notes {sorted(notes - cited)} are cited by no cell"


def test_every_runs_cell_names_its_test_and_every_named_test_is_a_test_function_of_its_file() -> None:
    runs = {(configuration, method) for configuration, cells in _table().items()
            for method, cell in cells.items() if cell.startswith("runs")}
    listed = {(configuration, method): node for configuration, nodes in _tests().items()
              for method, node in nodes.items()}
    assert sorted(runs - set(listed)) == [], "runs cells without a test under Tests"
    assert sorted(set(listed) - runs) == [], "tests listed for cells that are not runs"
    assert all(NODE.fullmatch(node) for node in listed.values()), listed  # each is a FILE::TEST node id
    named = NODE.findall(read(PAGE))
    assert len(named) >= len(runs) > 0
    missing = [f"{path}::{name}" for path, name, _ in named
               if not (REPO / path).is_file() or name not in _test_functions(path)]
    assert missing == [], f"{PAGE} names tests that do not exist: {missing}"
