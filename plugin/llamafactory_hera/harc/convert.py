"""``llamafactory-hera harc-data``: the public sources HARC's authors train on, as alpaca-format LLaMA-Factory
datasets named by their recipe keys, each read as the reference (``microsoft/HARC`` ``main/data.py``) reads it."""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_hera.harc.source_files import Row, column_text, missing_column, read_rows
from llamafactory_hera.runtime.errors import RecipeError

FULL_COMPLIANCE = "1_full_compliance"
ADVBENCH_COLUMNS = ("bad_q", "goal", "prompt")


@dataclass
class Converted:
    """One dataset to write; ``name`` is its dataset_info.json entry and recipe key."""

    name: str
    rows: list[dict[str, str]]
    skipped: int
    note: str = ""

    @property
    def file_name(self) -> str:
        return f"{self.name}.json"

    def summary(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"{self.name}: {len(self.rows)} rows, {self.skipped} skipped{note} -> {self.file_name}"


def alpaca(prompt: str, response: str) -> dict[str, str]:
    return {"instruction": prompt, "input": "", "output": response}


def _no_rows(where: str, what: str) -> RecipeError:
    return RecipeError(f"{where}: no usable row ({what}).")


def convert_circuit_breakers(path: Path) -> tuple[Converted, Converted]:
    """``harc_harmful`` (prompt -> llama3_output) and ``harc_harmful_completions`` (prompt -> output), row i of both
    from source row i, so a seeded split picks the same prompts, as the response-side directions need."""
    where = f"--circuit-breakers {path}"
    refusals = []
    completions = []
    skipped = 0
    for number, row in enumerate(read_rows(path, "--circuit-breakers"), 1):
        prompt, refusal, completion = (
            column_text(row, number, c, where) for c in ("prompt", "llama3_output", "output")
        )
        if not prompt.strip() or not refusal.strip() or not completion.strip():
            skipped += 1
            continue
        refusals.append(alpaca(prompt, refusal))
        completions.append(alpaca(prompt, completion))
    if not refusals:
        raise _no_rows(where, f"{skipped} rows with an empty prompt, llama3_output or output")
    note = "row i of both from the same source row"
    return (
        Converted("harc_harmful", refusals, skipped, note),
        Converted("harc_harmful_completions", completions, skipped, note),
    )


def convert_xstest(path: Path) -> Converted:
    """``harc_pseudo`` (prompt -> completion): rows labelled ``1_full_compliance``, once each (the reference repeats
    them up to 1500; HARC's trainer cycles a role's rows just as often)."""
    where = f"--xstest {path}"
    rows = []
    labelled = 0
    skipped = 0
    source = read_rows(path, "--xstest")
    for number, row in enumerate(source, 1):
        label, prompt, completion = (
            column_text(row, number, c, where) for c in ("final_label", "prompt", "completion")
        )
        if label.strip() != FULL_COMPLIANCE:
            continue
        labelled += 1
        if not prompt.strip() or not completion.strip():
            skipped += 1
            continue
        rows.append(alpaca(prompt, completion))
    if not rows:
        raise _no_rows(
            where,
            f"{labelled} of {len(source)} rows have final_label {FULL_COMPLIANCE}, {skipped} of "
            "them with an empty prompt or completion",
        )
    return Converted("harc_pseudo", rows, skipped, f"final_label {FULL_COMPLIANCE}: {labelled} of {len(source)}")


def _first_pair(row: Row, number: int, where: str) -> tuple[str, str] | None:
    """(first user turn, first answer) of an UltraChat row; None unless it opens with user then assistant."""
    if "messages" not in row:
        raise missing_column(row, number, "messages", where)
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RecipeError(
            f"{where}: row {number}, column 'messages': expected a list of {{role, content}}, got "
            f"{type(messages).__name__}."
        )
    for index, message in enumerate(messages[:2]):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecipeError(
                f"{where}: row {number}, column 'messages': message {index} is not a {{role, content}} object."
            )
        if not isinstance(message["content"], str | None):
            raise RecipeError(f"{where}: row {number}, column 'messages': the content of message {index} is not text.")
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        return None
    return messages[0]["content"] or "", messages[1]["content"] or ""


def convert_ultrachat(path: Path, seed: int, limit: int) -> Converted:
    """``harc_harmless`` from UltraChat 200k ``test_sft``, shuffled with ``random.Random(seed)`` and walked until
    ``limit`` rows are kept, as the reference does. Every row is checked: a malformed file fails whatever the seed."""
    where = f"--ultrachat {path}"
    source = read_rows(path, "--ultrachat")
    pairs = [_first_pair(row, number, where) for number, row in enumerate(source, 1)]
    order = list(range(len(source)))
    random.Random(seed).shuffle(order)
    rows = []
    skipped = 0
    for index in order:
        if len(rows) >= limit:
            break
        pair = pairs[index]
        if pair is None or not pair[0].strip() or not pair[1].strip():
            skipped += 1
            continue
        rows.append(alpaca(*pair))
    if not rows:
        raise _no_rows(where, f"none of {len(source)} rows opens with a non-empty user turn and assistant answer")
    short = f" (fewer than --harmless-rows {limit})" if len(rows) < limit else ""
    return Converted("harc_harmless", rows, skipped, f"seed {seed}, {len(rows)} of {len(source)}{short}")


def convert_prompts(path: Path, option: str, name: str, columns: tuple[str, ...], limit: int) -> Converted:
    """``name`` (prompt -> "") from the first ``limit`` non-empty prompts, in the first of ``columns`` row 1 has;
    Alpaca's non-empty ``input`` is appended after a blank line."""
    where = f"{option} {path}"
    source = read_rows(path, option)
    if not source:
        raise _no_rows(where, "the file has no rows")
    column = next((c for c in columns if c in source[0]), columns[0])
    if len(columns) > 1 and column not in source[0]:
        raise RecipeError(
            f"{where}: row 1 has none of the columns {', '.join(repr(c) for c in columns)} "
            f"(its columns: {', '.join(map(str, source[0]))})."
        )
    prompts = []
    skipped = 0
    for number, row in enumerate(source, 1):
        prompt = column_text(row, number, column, where)
        if column == "instruction" and "input" in row:
            extra = column_text(row, number, "input", where)
            if extra.strip() and prompt.strip():
                prompt = f"{prompt}\n\n{extra}"
        if len(prompts) < limit:
            if prompt.strip():
                prompts.append(prompt)
            else:
                skipped += 1
    if not prompts:
        raise _no_rows(where, f"every '{column}' is empty")
    named = f" ('{column}')" if len(columns) > 1 else ""
    return Converted(
        name, [alpaca(p, "") for p in prompts], skipped, f"the first {len(prompts)} of {len(source)}{named}"
    )


def encode(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def plan_output(out: Path, datasets: list[Converted], force: bool = False) -> dict[Path, bytes]:
    """path -> bytes of every data file and the merged ``dataset_info.json``; FileExistsError for an entry or file
    that exists with other content, unless ``force`` (identical ones, a rerun, are no conflict)."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out}: not a folder.")
    info_path = out / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise RecipeError(
                f"{info_path}: cannot read it as JSON ({err}); fix or move it, or choose another --out."
            ) from None
        if not isinstance(info, dict):
            raise RecipeError(f"{info_path}: not a JSON object of datasets; fix or move it, or choose another --out.")
    writes: dict[Path, bytes] = {}
    conflicts: list[str] = []
    for dataset in datasets:
        entry = {"file_name": dataset.file_name}
        if dataset.name in info and info[dataset.name] != entry:
            conflicts.append(f"the entry '{dataset.name}' of {info_path}")
        info[dataset.name] = entry
        path = out / dataset.file_name
        data = encode(dataset.rows)
        if path.is_dir():
            raise RecipeError(f"--out {out}: {path} is a folder; move it or choose another --out.")
        if path.exists() and path.read_bytes() != data:
            conflicts.append(str(path))
        writes[path] = data
    if conflicts and not force:
        raise FileExistsError(
            f"would change {', '.join(conflicts)}; pass --force to replace them, or choose another --out."
        )
    writes[info_path] = encode(info)
    return writes


def write_output(writes: dict[Path, bytes]) -> None:
    """Each file via a temporary file and a rename; dataset_info.json last, so it never names a missing file."""
    for path, data in writes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)


# (flag, what it holds, what it gives)
SOURCES: tuple[tuple[str, str, str], ...] = (
    (
        "--circuit-breakers",
        "Circuit Breakers train JSON (circuit_breakers_train.json: prompt, output, llama3_output)",
        "harc_harmful (prompt -> refusal) and harc_harmful_completions (prompt -> harmful completion), row-aligned",
    ),
    (
        "--ultrachat",
        "UltraChat 200k test_sft rows as .jsonl, .json or .parquet (messages: [{role, content}])",
        "harc_harmless (first user turn -> first answer; seeded shuffle, cut to --harmless-rows)",
    ),
    (
        "--xstest",
        "XSTest v2 completions CSV (xstest_v2_completions_gpt4_gpteval.csv: prompt, completion, final_label)",
        "harc_pseudo (prompt -> completion, rows labelled 1_full_compliance)",
    ),
    (
        "--advbench",
        "AdvBench harmful_behaviors.csv (goal), or JSON / JSON Lines with bad_q, goal or prompt",
        "harc_extract_harmful (prompts for the prompt-side harmful mean; the reference's Qwen config)",
    ),
    (
        "--alpaca",
        "Alpaca JSON list or JSON Lines (instruction, optional input)",
        "harc_extract_harmless (prompts for the prompt-side harmless mean; the reference's Qwen config)",
    ),
)


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    verb = commands.add_parser(
        "harc-data",
        help="Convert HARC's public data sources into LLaMA-Factory datasets for stage: harc.",
        description="Convert the public sources the HARC authors train on (Circuit Breakers, UltraChat 200k, XSTest "
        "v2, optionally AdvBench and Alpaca) into alpaca-format datasets in --out, list them in its "
        "dataset_info.json (existing entries kept) and print the recipe lines that name them. Nothing is written "
        "unless every given source reads cleanly.",
    )
    for flag, holds, gives in SOURCES:
        verb.add_argument(flag, type=Path, default=None, metavar="PATH", help=f"{holds}; writes {gives}")
    verb.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the data files and dataset_info.json (the recipe's dataset_dir)",
    )
    verb.add_argument("--seed", type=int, default=0, help="seed of the UltraChat shuffle (default: 0, the reference's)")
    verb.add_argument(
        "--harmless-rows",
        type=int,
        default=5400,
        help="UltraChat rows to keep (default: 5400 = 5000 training + 300 extraction + 100 validation, "
        "the reference's)",
    )
    verb.add_argument(
        "--extract-rows",
        type=int,
        default=300,
        help="AdvBench and Alpaca rows to keep each, in file order (default: 300, the reference's)",
    )
    verb.add_argument(
        "--force",
        action="store_true",
        help="replace data files and dataset_info.json entries of the same names whose content differs",
    )
    return {"harc-data": run_harc_data}


def convert_sources(args: argparse.Namespace) -> list[Converted]:
    """Every dataset the given sources yield; an error on the first bad option or source, before any write."""
    if all(getattr(args, flag[2:].replace("-", "_")) is None for flag, _, _ in SOURCES):
        raise RecipeError("harc-data: give at least one source: " + ", ".join(flag for flag, _, _ in SOURCES) + ".")
    for flag, rows in (("--harmless-rows", args.harmless_rows), ("--extract-rows", args.extract_rows)):
        if rows < 1:
            raise RecipeError(f"harc-data: {flag} must be at least 1, got {rows}.")
    datasets: list[Converted] = []
    if args.circuit_breakers is not None:
        datasets.extend(convert_circuit_breakers(args.circuit_breakers))
    if args.ultrachat is not None:
        datasets.append(convert_ultrachat(args.ultrachat, seed=args.seed, limit=args.harmless_rows))
    if args.xstest is not None:
        datasets.append(convert_xstest(args.xstest))
    if args.advbench is not None:
        datasets.append(
            convert_prompts(args.advbench, "--advbench", "harc_extract_harmful", ADVBENCH_COLUMNS, args.extract_rows)
        )
    if args.alpaca is not None:
        datasets.append(
            convert_prompts(args.alpaca, "--alpaca", "harc_extract_harmless", ("instruction",), args.extract_rows)
        )
    return datasets


def run_harc_data(args: argparse.Namespace) -> None:
    datasets = convert_sources(args)
    write_output(plan_output(args.out, datasets, force=args.force))
    for dataset in datasets:
        print(dataset.summary())
    written = f"{len(datasets)} dataset{'' if len(datasets) == 1 else 's'}"
    print(f"# wrote {written} and dataset_info.json to {args.out}; in the stage: harc recipe:")
    for dataset in datasets:  # the role key is the dataset's name
        print(f"{dataset.name}: {dataset.name}")
    print(f"dataset_dir: {args.out.resolve()}")
