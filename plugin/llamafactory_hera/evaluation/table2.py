"""The paper's Table 2 layout of an eval: General, Knowledge, OCR and Vision group means, Delta Vision (run minus
baseline), the stage chains that produced both models, and, for a backbone of Table 2, the paper's published rows
beside them, marked as the paper's (:data:`PAPER_FILE`, with its source).

A group is a preset of :mod:`.presets` (Cambrian-1's groups, as the paper reports them); its mean is the mean of its
benchmarks' headline scores (:data:`SCORES`), each put on a 0-100 scale first: accuracies reported as fractions
times 100, MME's perception score (0-2000) divided by 20. A group with a benchmark missing (not run, or failed) has no
mean: the table names what is missing instead of averaging the rest. Imports nothing heavy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.evaluation.presets import PRESETS
from llamafactory_hera_patches.run_record import RUN_RECORD, read_record

PAPER_FILE = Path(__file__).with_name("paper_table2.yaml")
# the paper's column -> the preset holding its benchmarks
GROUPS = {"General": "general", "Knowledge": "knowledge", "OCR": "ocr", "Vision": "vision-centric"}
# each benchmark's headline metric (as lmms-eval 0.7.3 names it) and the factor that puts it on 0-100
SCORES: dict[str, tuple[str, float]] = {
    "mme": ("mme_perception_score", 1 / 20),  # MME-P, out of 2000 (Cambrian-1 averages MME-P, not cognition)
    "mmbench_en_dev_static": ("gpt_eval_score", 1.0),  # already a percentage
    "seedbench": ("seed_image", 100.0),  # SEED-Bench's image part (the paper's SEED-I)
    "gqa": ("exact_match", 100.0),
    "scienceqa_img": ("exact_match", 100.0),
    "mmmu_val": ("mmmu_acc", 100.0),
    "ai2d": ("exact_match,flexible-extract", 100.0),
    "chartqa": ("relaxed_overall", 100.0),
    "ocrbench": ("ocrbench_accuracy", 100.0),  # the score out of 1000, divided by 1000 by lmms-eval
    "textvqa_val": ("exact_match", 100.0),
    "docvqa_val": ("anls", 100.0),
    "cv_bench_2d": ("cv_bench_acc", 100.0),
    "cv_bench_3d": ("cv_bench_acc", 100.0),
    "mmvp": ("mmvp_accuracy", 100.0),  # per question; the pair accuracy stays in the per-task table
    "realworldqa": ("exact_match", 100.0),
}
# where a preset holds fewer benchmarks than the paper's group: the paper's column is not the same mean
DIFFERS = {"Knowledge": "the paper's Knowledge (Cambrian-1's) also averages MathVista, which the knowledge preset "
                        "leaves out (a GPT judge): compare its Knowledge column with care"}
NOT_PUBLISHED = "not published here"


def _scores(rows: list[dict[str, Any]], side: str) -> dict[str, float]:
    """task -> its headline score on 0-100, for ``side`` ("run" / "baseline")."""
    found = {}
    for row in rows:
        wanted = SCORES.get(row["task"])
        if wanted and row["metric"] == wanted[0] and row.get(side) is not None:
            found[row["task"]] = row[side] * wanted[1]
    return found


def group_means(rows: list[dict[str, Any]], side: str) -> dict[str, dict[str, Any]]:
    """column -> ``{"mean", "benchmarks", "missing"}`` for ``side``; ``mean`` is None when a benchmark is missing."""
    scores = _scores(rows, side)
    means = {}
    for column, preset in GROUPS.items():
        tasks = PRESETS[preset].tasks
        missing = [task for task in tasks if task not in scores]
        mean = None if missing else round(sum(scores[task] for task in tasks) / len(tasks), 4)
        means[column] = {"mean": mean, "benchmarks": {task: scores.get(task) for task in tasks}, "missing": missing}
    return means


def _run_record(run_dir: str) -> dict[str, Any]:
    """The run's record (a ``checkpoint-N`` folder: its run's), or ``{}``: it holds the chain, read at train time."""
    folder = Path(run_dir)
    if not (folder / RUN_RECORD).is_file() and folder.name.startswith("checkpoint-"):
        folder = folder.parent
    return read_record(folder / RUN_RECORD)


def _stage_name(stage: Any) -> str:
    return {"hera": "HeRA", "sft": "SFT", "rah": "RAH-LoRA", "harc": "HARC"}.get(str(stage), str(stage))


def chain_words(chain: list[dict[str, Any]], numbered: bool) -> str:
    """``HeRA stage 1 -> HeRA stage 2`` (``numbered``) or ``SFT -> SFT``; empty for no recorded chain."""
    runs = [link for link in chain if "stage" in link]
    return " -> ".join(_stage_name(link["stage"]) + (f" stage {number}" if numbered and len(runs) > 1 else "")
                       for number, link in enumerate(runs, 1))


def _name(path: Any) -> str:
    return Path(str(path or "")).name


@functools.cache
def _paper() -> dict[str, Any]:
    return yaml.safe_load(PAPER_FILE.read_text(encoding="utf-8"))


def paper_backbone(names: list[Any]) -> tuple[str, dict[str, Any]] | None:
    """The first of ``names`` (LLM names or paths) that is a backbone of Table 2: (the paper's name, its entry)."""
    for name in names:
        short = _name(name).lower()
        for backbone, entry in _paper()["backbones"].items():
            if short and re.search(rf"(?<![a-z0-9.]){entry['match']}(?![0-9.])", short):
                return backbone, entry
    return None


def table2(record: dict[str, Any]) -> dict[str, Any] | None:
    """The layout of an eval report ``record`` (see :mod:`.report`), or None when no task of the four groups ran."""
    planned = {row["task"] for row in record["rows"]}
    if not planned & {task for preset in GROUPS.values() for task in PRESETS[preset].tasks}:
        return None
    recorded = _run_record(record["run"]["run_dir"])
    run_chain = recorded.get("chain") or []
    base_chain = ((_run_record(record["baseline"]["run_dir"]).get("chain") or [])
                  if record["baseline"] and record["baseline"]["trained"] else [])
    llm = next((link for link in run_chain if "compose" in link), None)
    title = ", ".join(part for part in (
        f"{_name(llm['llm'])} + {_name(llm['vision'])}" if llm else record["run"]["title"],
        chain_words(run_chain, numbered=True)) if part)
    if record["baseline"]:
        title += " vs " + (chain_words(base_chain, numbered=False) or record["baseline"]["title"])
    run, baseline = group_means(record["rows"], "run"), group_means(record["rows"], "baseline")
    mine, theirs = run["Vision"]["mean"], baseline["Vision"]["mean"]
    found = paper_backbone([llm["llm"] if llm else None, (recorded.get("loading") or {}).get("model_name_or_path")])
    paper = None
    if found:
        backbone, entry = found
        paper = {"backbone": backbone, "source": _paper()["source"], "delta_vision": entry.get("delta_vision"),
                 **{side: dict(zip(GROUPS, entry.get(side) or [None] * len(GROUPS), strict=True))
                    for side in ("baseline", "hera")}}
    return {"title": title, "run_chain": run_chain, "baseline_chain": base_chain, "run": run, "baseline": baseline,
            "delta_vision": None if mine is None or theirs is None else round(mine - theirs, 4), "paper": paper,
            "notes": [f"{column}: {note}" for column, note in DIFFERS.items()
                      if planned & set(run[column]["benchmarks"])]}


def _cell(value: float | None, signed: bool = False, absent: str = "–") -> str:
    return absent if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def markdown_lines(layout: dict[str, Any], run_title: str, baseline_title: str | None) -> list[str]:
    """The layout as a markdown table (also what the console prints), then what is missing and the notes."""
    lines = [f"Table 2 layout: {layout['title']}", "", f"| model | {' | '.join(GROUPS)} | Δ Vision |",
             "| --- |" + " ---: |" * (len(GROUPS) + 1)]
    sides = [("run: " + run_title, layout["run"], layout["delta_vision"])]
    if baseline_title:
        sides.append(("baseline: " + baseline_title, layout["baseline"], None))
    for label, means, delta in sides:
        cells = " | ".join(_cell(means[column]["mean"]) for column in GROUPS)
        lines.append(f"| {label} | {cells} | {_cell(delta, signed=True)} |")
    paper = layout["paper"]
    if paper:
        for side, label in (("baseline", "LLaVA-1.5 baseline"), ("hera", "+ HeRA")):
            cells = " | ".join(_cell(paper[side][column], absent=NOT_PUBLISHED) for column in GROUPS)
            delta = _cell(paper["delta_vision"], signed=True, absent=NOT_PUBLISHED) if side == "hera" else ""
            lines.append(f"| paper's Table 2: {paper['backbone']} {label} | {cells} | {delta} |")
    lines.append("")
    for label, means in (("run", layout["run"]), ("baseline", layout["baseline"] if baseline_title else {})):
        for column, group in means.items():
            if group["missing"]:
                lines.append(f"- {label} {column}: no mean, missing {', '.join(group['missing'])}")
    if paper:
        lines.append(f"- the paper's rows: {paper['source']}; its training and evaluation, not this run's")
    lines += [f"- {note}" for note in layout["notes"]]
    return lines
