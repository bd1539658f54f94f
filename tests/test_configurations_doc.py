"""docs/configurations.md's method x configuration table (issue 56 item 5): every pair has a cell, every cell is
"runs (tested by `FILE::TEST`)", "refused: why" or "no test: what is known", and every test a cell or a note names
is a test function of that file (a parametrized id in brackets is allowed). No model, no run."""

from __future__ import annotations

import ast
import re

from conftest import REPO
from markdown_docs import read

PAGE = "docs/configurations.md"
METHODS = ("HeRA", "HARC", "RAH-LoRA")
CONFIGURATIONS = ("LoRA", "full", "freeze", "QLoRA 4-bit", "QLoRA 8-bit", "checkpoint saved quantized", "DoRA",
                  "DDP", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3", "DeepSpeed ZeRO-3 + QLoRA 4-bit",
                  "DeepSpeed ZeRO-3 + DoRA", "FSDP2, LoRA", "FSDP2, full",
                  "FSDP2, bf16", "FSDP2, CPU offload", "FSDP + QLoRA, LLaMA-Factory's example", "FSDP2 + QLoRA",
                  "FSDP2 + QLoRA, efficient loading", "FSDP2 + QLoRA 8-bit",
                  "FSDP1", "packing", "streaming")
RUNS = re.compile(r"^runs \(tested by `([^`]+)`\)$")
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`")


def _table() -> dict[str, dict[str, str]]:
    """configuration (the first cell, up to its first parenthesis) -> method -> cell."""
    rows = [line for line in read(PAGE).splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    methods = [cell.split(" (")[0] for cell in header[1:]]
    table = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(header), row
        table[cells[0].split(" (")[0]] = dict(zip(methods, cells[1:], strict=True))
    return table


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_method_and_configuration_has_a_cell_of_a_known_form() -> None:
    table = _table()
    assert list(table) == list(CONFIGURATIONS), list(table)
    for configuration, cells in table.items():
        assert list(cells) == list(METHODS), (configuration, list(cells))
        for method, cell in cells.items():
            assert RUNS.match(cell) or re.match(r"^(refused|no test): \S", cell), (configuration, method, cell)
    notes = set(re.findall(r"^- (N\d+)\. ", read(PAGE), flags=re.M))
    cited = {note for cells in table.values() for cell in cells.values() for note in re.findall(r"\((N\d+)\)", cell)}
    assert cited <= notes, f"cells cite notes {sorted(cited - notes)} that {PAGE} does not have"


def test_every_named_test_is_a_test_function_of_its_file() -> None:
    named = NODE.findall(read(PAGE))
    runs = [RUNS.match(cell).group(1) for cells in _table().values() for cell in cells.values() if RUNS.match(cell)]
    assert len(runs) == sum(1 for cell in runs if NODE.fullmatch(f"`{cell}`")), runs  # each runs cell is a node id
    assert len(named) >= len(runs) > 0
    missing = [f"{path}::{name}" for path, name, _ in named
               if not (REPO / path).is_file() or name not in _test_functions(path)]
    assert missing == [], f"{PAGE} names tests that do not exist: {missing}"
