"""The ``data`` verb of ``llamafactory-hera`` (added by :func:`add_verbs` in :mod:`llamafactory_hera.cli`).

    llamafactory-hera data check RECIPE.yaml [--verify-images] [--workers N]
                                                       count a recipe's rows and images; non-zero exit on missing ones
    llamafactory-hera data convert LLAVA.json [--output OUT.json] [--force]
                                                       LLaVA's JSON with string ids, as LLaMA-Factory's loader needs
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.short_errors import RecipeError

DEFAULT_WORKERS = min(16, os.cpu_count() or 1)


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add ``data`` (``check``, ``convert``) to the ``llamafactory-hera`` sub-command parsers; verb -> handler."""
    data = commands.add_parser(
        "data", help="Check a recipe's datasets and images before a long run; convert LLaVA's JSON where needed.",
        description="LLaVA's training data as it is downloaded (docs/llava-data.md).")
    verbs = data.add_subparsers(dest="data_command", required=True)
    check = verbs.add_parser(
        "check", help="Count a recipe's rows, text-only rows, rows HeRA can use and images; exit non-zero when "
        "images are missing or unreadable.",
        description="Load each dataset of the recipe (dataset, eval_dataset) with LLaMA-Factory's loader, as the run "
        "will (dataset_dir, dataset_info.json, media_dir), and check every distinct image file.")
    check.add_argument("recipe", type=Path, help="LLaMA-Factory training recipe (YAML)")
    check.add_argument("--verify-images", action="store_true",
                       help="open, verify and decode every image with PIL (default: stat only, that each file exists "
                       "and is not empty: minutes, where decoding LLaVA's ~0.6 M images takes hours of CPU)")
    check.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                       help=f"threads checking images (default: {DEFAULT_WORKERS}, the CPUs up to 16)")
    convert = verbs.add_parser(
        "convert", help="Write LLaVA's JSON with every id a string (llava_v1_5_mix665k.json needs it).",
        description="LLaMA-Factory's loader needs one type per column; llava_v1_5_mix665k.json mixes string and "
        "integer ids. Writes a copy beside the source (NAME.string_ids.json) with every id a string, nothing else "
        "changed; again is a no-op, a different existing file is replaced only with --force.")
    convert.add_argument("source", type=Path, help="LLaVA's JSON file (a list of rows with conversations)")
    convert.add_argument("--output", type=Path, default=None, help="where to write (default: SOURCE's folder, "
                         "NAME.string_ids.json)")
    convert.add_argument("--force", action="store_true", help="replace an existing different --output")
    return {"data": run_data_verb}


def run_data_verb(args: argparse.Namespace) -> None:
    """``data check`` or ``data convert``."""
    if args.data_command == "convert":
        from llamafactory_hera.llava_data.convert import convert_file

        print(convert_file(args.source, args.output, force=args.force).summary())
        return
    from llamafactory_hera.llava_data.check import check_recipe, failure, report

    counts, media_dir = check_recipe(args.recipe, decode=args.verify_images, workers=args.workers)
    print(report(counts, media_dir, decode=args.verify_images), flush=True)
    problem = failure(counts)
    if problem:
        raise RecipeError(problem)
