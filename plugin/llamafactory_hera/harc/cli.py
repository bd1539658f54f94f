"""HARC's verb of ``llamafactory-hera`` (added by :func:`add_verbs`, declared in :mod:`llamafactory_hera.harc.method`).

    llamafactory-hera harc-data --out DIR [--circuit-breakers JSON] [--xstest CSV] [--ultrachat FILE]
                                [--advbench FILE] [--alpaca FILE] [--seed N] [--harmless-rows N] [--extract-rows N]
                                [--force]

converts the public sources of the HARC authors' code into LLaMA-Factory datasets (see
:mod:`llamafactory_hera.harc.convert`) and prints the recipe lines that name them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.harc.convert import (
    Converted,
    convert_advbench,
    convert_alpaca,
    convert_circuit_breakers,
    convert_ultrachat,
    convert_xstest,
    plan_output,
    write_output,
)
from llamafactory_hera.short_errors import RecipeError

# (flag, what it holds, what it gives)
SOURCES: tuple[tuple[str, str, str], ...] = (
    ("--circuit-breakers", "Circuit Breakers train JSON (circuit_breakers_train.json: prompt, output, llama3_output)",
     "harc_harmful (prompt -> refusal) and harc_harmful_completions (prompt -> harmful completion), row-aligned"),
    ("--ultrachat", "UltraChat 200k test_sft rows as .jsonl, .json or .parquet (messages: [{role, content}])",
     "harc_harmless (first user turn -> first answer; seeded shuffle, cut to --harmless-rows)"),
    ("--xstest", "XSTest v2 completions CSV (xstest_v2_completions_gpt4_gpteval.csv: prompt, completion, "
     "final_label)", "harc_pseudo (prompt -> completion, rows labelled 1_full_compliance)"),
    ("--advbench", "AdvBench harmful_behaviors.csv (goal), or JSON / JSON Lines with bad_q, goal or prompt",
     "harc_extract_harmful (prompts for the prompt-side harmful mean; the reference's Qwen config)"),
    ("--alpaca", "Alpaca JSON list or JSON Lines (instruction, optional input)",
     "harc_extract_harmless (prompts for the prompt-side harmless mean; the reference's Qwen config)"),
)


def _dest(flag: str) -> str:
    """The attribute of the parsed arguments that ``flag`` fills (``--harmless-rows`` -> ``harmless_rows``)."""
    return flag.lstrip("-").replace("-", "_")


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add ``harc-data`` to the ``llamafactory-hera`` sub-command parsers; verb -> handler."""
    verb = commands.add_parser(
        "harc-data", help="Convert HARC's public data sources into LLaMA-Factory datasets for stage: harc.",
        description="Convert the public sources the HARC authors train on (Circuit Breakers, UltraChat 200k, XSTest "
        "v2, optionally AdvBench and Alpaca) into alpaca-format datasets in --out, list them in its "
        "dataset_info.json (existing entries kept) and print the recipe lines that name them. Nothing is written "
        "unless every given source reads cleanly.")
    for flag, holds, gives in SOURCES:
        verb.add_argument(flag, type=Path, default=None, metavar="PATH", help=f"{holds}; writes {gives}")
    verb.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="folder for the data files and dataset_info.json (the recipe's dataset_dir)")
    verb.add_argument("--seed", type=int, default=0, help="seed of the UltraChat shuffle (default: 0, the reference's)")
    verb.add_argument("--harmless-rows", type=int, default=5400,
                      help="UltraChat rows to keep (default: 5400 = 5000 training + 300 extraction + 100 validation, "
                      "the reference's)")
    verb.add_argument("--extract-rows", type=int, default=300,
                      help="AdvBench and Alpaca rows to keep each, in file order (default: 300, the reference's)")
    verb.add_argument("--force", action="store_true",
                      help="replace data files and dataset_info.json entries of the same names whose content differs")
    return {"harc-data": run_harc_data}


def convert_sources(args: argparse.Namespace) -> list[Converted]:
    """Every dataset the given sources yield, in recipe order; ValueError / FileNotFoundError on the first bad
    option or source (before anything is written)."""
    given = [flag for flag, _, _ in SOURCES if getattr(args, _dest(flag)) is not None]
    if not given:
        raise RecipeError("harc-data: give at least one source: " + ", ".join(flag for flag, _, _ in SOURCES) + ".")
    for flag in ("--harmless-rows", "--extract-rows"):
        if getattr(args, _dest(flag)) < 1:
            raise RecipeError(f"harc-data: {flag} must be at least 1, got {getattr(args, _dest(flag))}.")
    datasets: list[Converted] = []
    if args.circuit_breakers is not None:
        datasets.extend(convert_circuit_breakers(args.circuit_breakers))
    if args.ultrachat is not None:
        datasets.append(convert_ultrachat(args.ultrachat, seed=args.seed, limit=args.harmless_rows))
    if args.xstest is not None:
        datasets.append(convert_xstest(args.xstest))
    if args.advbench is not None:
        datasets.append(convert_advbench(args.advbench, limit=args.extract_rows))
    if args.alpaca is not None:
        datasets.append(convert_alpaca(args.alpaca, limit=args.extract_rows))
    return datasets


def recipe_lines(datasets: list[Converted], out: Path) -> list[str]:
    """The lines of a ``stage: harc`` recipe that name the written datasets (the role key is the dataset's name)."""
    return [f"{dataset.name}: {dataset.name}" for dataset in datasets] + [f"dataset_dir: {out.resolve()}"]


def run_harc_data(args: argparse.Namespace) -> None:
    """``harc-data``: read and check every source, check --out, write the datasets and dataset_info.json, print one
    summary line per dataset and the recipe lines."""
    datasets = convert_sources(args)
    write_output(plan_output(args.out, datasets, force=args.force))
    for dataset in datasets:
        print(dataset.summary())
    written = f"{len(datasets)} dataset{'' if len(datasets) == 1 else 's'}"
    print(f"# wrote {written} and dataset_info.json to {args.out}; in the stage: harc recipe:")
    print("\n".join(recipe_lines(datasets, args.out)))
