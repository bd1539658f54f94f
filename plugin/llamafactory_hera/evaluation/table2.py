"""An eval in HeRA's Table 2 or RAH-LoRA's Table 1 layout (docs/eval.md, "Group means"). Light imports."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.evaluation.presets import PRESETS
from llamafactory_hera.evaluation.protocols import (
    MARK,
    RAH_PROTOCOLS,
    TABLE2_COLUMN_NOTES,
    TABLE2_PROTOCOLS,
    Protocol,
    described,
    differences,
    header,
    scores,
)
from llamafactory_hera.runtime.run_record import RUN_RECORD, read_record

PAPER_FILE = Path(__file__).with_name("paper_table2.yaml")
RAH_PAPER_FILE = Path(__file__).with_name("paper_rah_table1.yaml")
# paper column -> preset
GROUPS = {"General": "general", "Knowledge": "knowledge", "OCR": "ocr", "Vision": "vision-centric"}
# benchmark -> (headline metric, factor to 0-100)
SCORES: dict[str, tuple[str, float]] = scores(TABLE2_PROTOCOLS)
NOT_PUBLISHED = "not published here"
STAGE_NAMES = {"hera": "HeRA", "sft": "SFT", "rah": "RAH-LoRA", "harc": "HARC"}


@dataclass(frozen=True)
class PaperTable:
    """``delta``: the column whose run-minus-baseline difference is shown (None: none)."""

    key: str  # in the report record
    title: str
    file: Path
    columns: dict[str, tuple[str, ...]]
    scores: dict[str, tuple[str, float]]
    delta: str | None
    paper_rows: tuple[tuple[str, str], ...]  # (YAML key, label)
    differs: dict[str, str]  # marked column -> how it differs
    protocols: dict[str, tuple[Protocol, ...]]


TABLE2 = PaperTable(
    "table2",
    "Table 2",
    PAPER_FILE,
    {column: PRESETS[preset].tasks for column, preset in GROUPS.items()},
    SCORES,
    "Vision",
    (("baseline", "LLaVA-1.5 baseline"), ("hera", "+ HeRA")),
    differences(TABLE2_PROTOCOLS, TABLE2_COLUMN_NOTES),
    TABLE2_PROTOCOLS,
)
# in the paper's column order; MME-P out of 2000, as printed
RAH_TABLE1 = PaperTable(
    "rah_table1",
    "RAH-LoRA Table 1",
    RAH_PAPER_FILE,
    {column: tuple(p.task for p in benchmarks) for column, benchmarks in RAH_PROTOCOLS.items()},
    scores(RAH_PROTOCOLS),
    None,
    (("baseline", "baseline"), ("rah", "+ RAH-LoRA")),
    differences(RAH_PROTOCOLS, {}),
    RAH_PROTOCOLS,
)


def _scores(rows: list[dict[str, Any]], side: str, table: PaperTable) -> dict[str, float]:
    found = {}
    for row in rows:
        wanted = table.scores.get(row["task"])
        if wanted and row["metric"] == wanted[0] and row.get(side) is not None:
            found[row["task"]] = row[side] * wanted[1]
    return found


def group_means(rows: list[dict[str, Any]], side: str, table: PaperTable = TABLE2) -> dict[str, dict[str, Any]]:
    """column -> ``{"mean", "benchmarks", "missing"}``; ``mean`` None when a benchmark is missing."""
    scores = _scores(rows, side, table)
    means = {}
    for column, tasks in table.columns.items():
        missing = [task for task in tasks if task not in scores]
        mean = None if missing else round(sum(scores[task] for task in tasks) / len(tasks), 4)
        means[column] = {"mean": mean, "benchmarks": {task: scores.get(task) for task in tasks}, "missing": missing}
    return means


def _run_record(run_dir: str) -> dict[str, Any]:
    folder = Path(run_dir)
    if not (folder / RUN_RECORD).is_file() and folder.name.startswith("checkpoint-"):
        folder = folder.parent
    return read_record(folder / RUN_RECORD)


def chain_words(chain: list[dict[str, Any]], numbered: bool) -> str:
    """``HeRA stage 1 -> HeRA stage 2`` (``numbered``) or ``SFT -> SFT``; "" without a chain."""
    runs = [link for link in chain if "stage" in link]
    return " -> ".join(
        STAGE_NAMES.get(str(link["stage"]), str(link["stage"]))
        + (f" stage {number}" if numbered and len(runs) > 1 else "")
        for number, link in enumerate(runs, 1)
    )


def _name(path: Any) -> str:
    return Path(str(path or "")).name


@functools.cache
def _paper(file: Path) -> dict[str, Any]:
    return yaml.safe_load(file.read_text(encoding="utf-8"))


def paper_backbone(names: list[Any], table: PaperTable = TABLE2) -> tuple[str, dict[str, Any]] | None:
    for name in names:
        short = _name(name).lower()
        for backbone, entry in _paper(table.file)["backbones"].items():
            if short and re.search(rf"(?<![a-z0-9.]){entry['match']}(?![0-9.])", short):
                return backbone, entry
    return None


def table2(record: dict[str, Any], table: PaperTable = TABLE2) -> dict[str, Any] | None:
    planned = {row["task"] for row in record["rows"]}
    if not planned & {task for tasks in table.columns.values() for task in tasks}:
        return None
    recorded = _run_record(record["run"]["run_dir"])
    run_chain = recorded.get("chain") or []
    base_chain = (
        (_run_record(record["baseline"]["run_dir"]).get("chain") or [])
        if record["baseline"] and record["baseline"]["trained"]
        else []
    )
    llm = next((link for link in run_chain if "compose" in link), None)
    title = ", ".join(
        part
        for part in (
            f"{_name(llm['llm'])} + {_name(llm['vision'])}" if llm else record["run"]["title"],
            chain_words(run_chain, numbered=True),
        )
        if part
    )
    if record["baseline"]:
        title += " vs " + (chain_words(base_chain, numbered=False) or record["baseline"]["title"])
    run = group_means(record["rows"], "run", table)
    baseline = group_means(record["rows"], "baseline", table)
    found = paper_backbone(
        [llm["llm"] if llm else None, (recorded.get("loading") or {}).get("model_name_or_path")], table
    )
    delta = {}
    if table.delta:
        mine = run[table.delta]["mean"]
        theirs = baseline[table.delta]["mean"]
        delta = {_delta_key(table): None if mine is None or theirs is None else round(mine - theirs, 4)}
    paper = None
    if found:
        backbone, entry = found
        paper = {
            "backbone": backbone,
            "source": _paper(table.file)["source"],
            **({_delta_key(table): entry.get(_delta_key(table))} if table.delta else {}),
            **{
                side: dict(zip(table.columns, entry.get(side) or [None] * len(table.columns), strict=True))
                for side, _ in table.paper_rows
            },
        }
    return {
        "title": title,
        "run_chain": run_chain,
        "baseline_chain": base_chain,
        "run": run,
        "baseline": baseline,
        **delta,
        "paper": paper,
        "marked": dict(table.differs),
        "protocol": described(table.protocols),
        "notes": [f"{header(column, table.differs)}: {note}" for column, note in table.differs.items()],
    }


def _delta_key(table: PaperTable) -> str:
    return f"delta_{(table.delta or '').lower()}"


def _cell(value: float | None, signed: bool = False, absent: str = "–") -> str:
    return absent if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def markdown_lines(
    layout: dict[str, Any], run_title: str, baseline_title: str | None, table: PaperTable = TABLE2
) -> list[str]:
    columns = list(table.columns)
    delta_head = f" Δ {header(table.delta, layout['marked'])} |" if table.delta else ""
    heads = " | ".join(header(column, layout["marked"]) for column in columns)
    lines = [
        f"{table.title} layout: {layout['title']}",
        "",
        f"| model | {heads} |{delta_head}",
        "| --- |" + " ---: |" * (len(columns) + bool(table.delta)),
    ]
    sides = [("run: " + run_title, layout["run"], layout.get(_delta_key(table)))]
    if baseline_title:
        sides.append(("baseline: " + baseline_title, layout["baseline"], None))
    for label, means, delta in sides:
        cells = " | ".join(_cell(means[column]["mean"]) for column in columns)
        lines.append(f"| {label} | {cells} |" + (f" {_cell(delta, signed=True)} |" if table.delta else ""))
    paper = layout["paper"]
    if paper:
        for number, (side, label) in enumerate(table.paper_rows):
            cells = " | ".join(_cell(paper[side][column], absent=NOT_PUBLISHED) for column in columns)
            delta = ""
            if table.delta:  # on the method's (last) row
                shown = _cell(paper[_delta_key(table)], signed=True, absent=NOT_PUBLISHED)
                delta = f" {shown if number == len(table.paper_rows) - 1 else ''} |"
            lines.append(f"| paper's {table.title}: {paper['backbone']} {label} | {cells} |{delta}")
    lines.append("")
    for label, means in (("run", layout["run"]), ("baseline", layout["baseline"] if baseline_title else {})):
        for column, group in means.items():
            if group["missing"]:
                lines.append(f"- {label} {column}: no mean, missing {', '.join(group['missing'])}")
    if paper:
        lines.append(f"- the paper's rows: {paper['source']}; its training and evaluation, not this run's")
    if layout["notes"]:
        lines.append(
            f'- {MARK}: computed otherwise than the paper, as follows (docs/eval.md, "What each paper reports"):'
        )
    lines += [f"- {note}" for note in layout["notes"]]
    return lines
