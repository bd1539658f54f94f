"""The jailbreak task's ``--prompts FILE`` and ``--targets FILE`` (docs/eval.md, "Jailbreak robustness")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_hera.harc.source_files import column_text, read_csv, read_text
from llamafactory_hera.runtime.errors import RecipeError

ADVBENCH = ("goal", "target")
HARMBENCH = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
HASH_CHECK = "hash_check"


@dataclass(frozen=True)
class AttackData:
    """``targets``: GCG's (prompt, target) pairs; ``behaviours``: (prompt, behaviour, context) where they differ from
    the prompt; ``note``: rows left out."""

    prompts: tuple[str, ...]
    targets: tuple[tuple[str, str], ...] = ()
    behaviours: tuple[tuple[str, str, str], ...] = ()
    format: str = "JSON"
    note: str = ""


def harmbench_prompt(behaviour: str, context: str) -> str:
    """HarmBench's prompt for a behaviour: its context first, if any (DirectRequest, GCG)."""
    return f"{context}\n\n---\n\n{behaviour}" if context else behaviour


def _text(row: dict[str, Any], number: int | str, column: str, where: str, required: bool = True) -> str:
    text = column_text(row, number, column, where)
    if required and not text.strip():
        raise RecipeError(f"{where}: row {number}, column '{column}' is empty; every row needs it")
    return text


def _read_targets(path: Path | None, ids: list[str]) -> dict[str, str]:
    if path is None:
        return {}
    where = f"--targets {path}"
    if not path.is_file():
        raise RecipeError(f"{where}: not a file; give HarmBench's data/optimizer_targets/harmbench_targets_text.json")
    try:
        data = json.loads(read_text(path, where))
    except json.JSONDecodeError as err:
        raise RecipeError(f"{where}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: a JSON {type(data).__name__}; HarmBench's targets are an object BehaviorID -> target"
        )
    for key in ids:
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            raise RecipeError(f"{where}: the target of '{key}' is not a non-empty string")
    return {key: data[key] for key in ids if key in data}


def _read_harmbench(rows: list[tuple[str, dict[str, Any]]], where: str, targets_file: Path | None) -> AttackData:
    prompts = []
    behaviours = []
    ids = []
    left_out = 0
    for number, row in rows:
        behaviour = _text(row, number, "Behavior", where)
        behaviour_id = _text(row, number, "BehaviorID", where)
        tags = [tag.strip() for tag in _text(row, number, "Tags", where, required=False).split(",")]
        context = _text(row, number, "ContextString", where, required=False)
        if "context" in tags and not context.strip():
            raise RecipeError(f"{where}: row {number}, column 'ContextString' is empty, but its Tags say 'context'")
        if HASH_CHECK in tags:
            left_out += 1
            continue
        prompts.append(harmbench_prompt(behaviour, context))
        behaviours.append((prompts[-1], behaviour, context))
        ids.append(behaviour_id)
    found = _read_targets(targets_file, ids)
    targets = tuple((prompt, found[key]) for prompt, key in zip(prompts, ids, strict=True) if key in found)
    note = (
        (
            f"{left_out} copyright behaviours left out (HarmBench scores them by hashing against its reference "
            "texts, not by a classifier)"
        )
        if left_out
        else ""
    )
    return AttackData(
        tuple(prompts), targets, tuple(b for b in behaviours if b[0] != b[1] or b[2]), "HarmBench behaviours CSV", note
    )


def _read_csv(path: Path, targets_file: Path | None) -> AttackData:
    where = f"--prompts {path}"
    rows = [(f"{number} (line {line})", row) for number, (line, row) in enumerate(read_csv(path, where), 1)]
    header = list(rows[0][1]) if rows else []
    if set(HARMBENCH) <= set(header):
        return _read_harmbench(rows, where, targets_file)
    for article, name, columns in (("a", "HarmBench behaviours", HARMBENCH), ("an", "AdvBench", ADVBENCH)):
        missing = [column for column in columns if column not in header]
        if 0 < len(missing) < len(columns) and "prompt" not in header:  # some of that format's columns, not all
            raise RecipeError(
                f"{where}: {article} {name} CSV without its column(s) {', '.join(missing)} (its "
                f"columns: {', '.join(header)}); {name} CSVs have {','.join(columns)}: add the missing "
                "column(s), or give a 'prompt' column"
            )
    if targets_file is not None:
        raise RecipeError(
            f"--targets {targets_file}: HarmBench's targets (by BehaviorID), but {path} is not a "
            f"HarmBench behaviours CSV (columns {', '.join(header)}); leave --targets out"
        )
    if set(ADVBENCH) <= set(header):
        pairs = [(_text(row, n, "goal", where), _text(row, n, "target", where)) for n, row in rows]
        return AttackData(tuple(p for p, _ in pairs), tuple(pairs), format="AdvBench CSV (goal, target)")
    if "prompt" in header:
        prompts = tuple(_text(row, n, "prompt", where) for n, row in rows)
        targets = tuple((row["prompt"], _text(row, n, "target", where)) for n, row in rows if "target" in header)
        return AttackData(prompts, targets, format="CSV (prompt)")
    raise RecipeError(
        f"{where}: a CSV without prompts (its columns: {', '.join(header) or 'none'}); give AdvBench's "
        f"({','.join(ADVBENCH)}), HarmBench's ({','.join(HARMBENCH)}) or a 'prompt' column"
    )


def _read_json(path: Path) -> AttackData:
    text = read_text(path, f"--prompts {path}").strip()
    try:
        items = (
            json.loads(text)
            if text.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as err:
        raise RecipeError(f"--prompts: {path} is neither a JSON list nor JSONL ({err})") from err
    prompts = [item.get("prompt") if isinstance(item, dict) else item for item in items]
    for number, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(
                f"--prompts {path}: item {number}: not a non-empty string or an object with a non-empty 'prompt'"
            )
    targets = [(item["prompt"], item["target"]) for item in items if isinstance(item, dict) and "target" in item]
    if any(not isinstance(target, str) or not target.strip() for _, target in targets):
        raise RecipeError(
            f"--prompts: {path}: a 'target' must be a non-empty string (the answer start GCG optimises towards)"
        )
    return AttackData(tuple(prompts), tuple(targets), format="JSON" if text.startswith("[") else "JSONL")


def read_attack_data(path: Path, targets_file: Path | None = None) -> AttackData:
    if not path.is_file():
        raise RecipeError(
            f"--prompts: {path} is not a file; give a JSON list, JSONL, AdvBench's or HarmBench's CSV of prompts"
        )
    if targets_file is not None and path.suffix.lower() != ".csv":
        raise RecipeError(
            f"--targets {targets_file}: HarmBench's targets by BehaviorID, for a HarmBench behaviours "
            f"CSV, but --prompts is {path.name}; give targets in the file's objects ('target')"
        )
    data = _read_csv(path, targets_file) if path.suffix.lower() == ".csv" else _read_json(path)
    if not data.prompts:
        raise RecipeError(
            f"--prompts: {path} holds no prompt; give at least one" + (f" ({data.note})" if data.note else "")
        )
    return data
