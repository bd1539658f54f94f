"""The LLaVA-1.5 verbs: ``compose``, ``data check`` and ``data convert``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.llava.compose_plan import DEFAULT_VISION, plan_compose
from llamafactory_hera.runtime.errors import RecipeError

DEFAULT_WORKERS = min(16, os.cpu_count() or 1)


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    parser = commands.add_parser(
        "compose",
        help="a LLaVA-1.5-style model from a text-only LLM and an image encoder",
        description="Write a LLaVA model (transformers' LlavaForConditionalGeneration) of the LLM's and the "
        "vision tower's weights and a fresh seeded 2-layer MLP projector, its processor, and "
        "llamafactory_hera_compose.json; print the template: line to train it with.",
    )
    parser.add_argument("--llm", required=True, help="a text-only LLM: Hub id or local folder")
    parser.add_argument(
        "--vision",
        default=DEFAULT_VISION,
        help=f"a CLIP or SigLIP image encoder: Hub id or local folder (default {DEFAULT_VISION})",
    )
    parser.add_argument("--output", required=True, type=Path, help="a new (or empty) folder for the model")
    parser.add_argument(
        "--family",
        default=None,
        help="the LLM's conversation format, instead of the one read from its config and tokenizer",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the projector's initialisation (default 42)")
    data = commands.add_parser(
        "data",
        help="Check a recipe's datasets and images before a long run; convert LLaVA's JSON where needed.",
        description="LLaVA's training data as it is downloaded (docs/llava-data.md).",
    )
    verbs = data.add_subparsers(dest="data_command", required=True)
    check = verbs.add_parser(
        "check",
        help="Count a recipe's rows, text-only rows, rows HeRA can use and images; exit non-zero when "
        "images are missing or unreadable.",
        description="Load each dataset of the recipe (dataset, eval_dataset) with LLaMA-Factory's loader, as the run "
        "will (dataset_dir, dataset_info.json, media_dir), and check every distinct image file.",
    )
    check.add_argument("recipe", type=Path, help="LLaMA-Factory training recipe (YAML)")
    check.add_argument(
        "--verify-images",
        action="store_true",
        help="open, verify and decode every image with PIL (default: stat only, that each file exists "
        "and is not empty: minutes, where decoding LLaVA's ~0.6 M images takes hours of CPU)",
    )
    check.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"threads checking images (default: {DEFAULT_WORKERS}, the CPUs up to 16)",
    )
    convert = verbs.add_parser(
        "convert",
        help="Write LLaVA's JSON with every id a string (llava_v1_5_mix665k.json needs it).",
        description="LLaMA-Factory's loader needs one type per column; llava_v1_5_mix665k.json mixes string and "
        "integer ids. Writes a copy beside the source (NAME.string_ids.json) with every id a string, nothing else "
        "changed; again is a no-op, a different existing file is replaced only with --force.",
    )
    convert.add_argument("source", type=Path, help="LLaVA's JSON file (a list of rows with conversations)")
    convert.add_argument(
        "--output", type=Path, default=None, help="where to write (default: SOURCE's folder, NAME.string_ids.json)"
    )
    convert.add_argument("--force", action="store_true", help="replace an existing different --output")
    return {"compose": run_compose, "data": run_data_verb}


def run_data_verb(args: argparse.Namespace) -> None:
    if args.data_command == "convert":
        # lazy: only for data convert (every verb's parser imports this module)
        from llamafactory_hera.llava.data_convert import convert_file

        print(convert_file(args.source, args.output, force=args.force).summary())
        return
    # lazy: datasets and the host, only for data check
    from llamafactory_hera.llava.data_check import check_recipe, failure, report

    counts, media_dir = check_recipe(args.recipe, decode=args.verify_images, workers=args.workers)
    print(report(counts, media_dir, decode=args.verify_images), flush=True)
    problem = failure(counts)
    if problem:
        raise RecipeError(problem)


def run_compose(args: argparse.Namespace) -> None:
    plan, tokenizer = plan_compose(args.llm, args.vision, args.output, args.family, args.seed)
    # lazy: torch and the model classes, after the plan's refusals
    from llamafactory_hera.llava.compose_build import RECORD, compose

    record = compose(plan, tokenizer)
    strategy = {"default": "its [CLS] dropped", "full": "every patch token (no [CLS])"}[plan.geometry.select_strategy]
    print(f"composed {record['architecture']} in {plan.output}")
    print(f"  llm:       {plan.llm} (family {plan.family}: {plan.family_reason})")
    print(
        f"  vision:    {plan.vision} ({plan.geometry.encoder}, layer {plan.geometry.feature_layer}, {strategy}: "
        f"{plan.geometry.image_seq_length} image tokens per image)"
    )
    print(f"  projector: {record['projector']}; {record['projector_init']}, seed {plan.seed}")
    print(f"  tokenizer: {record['added_token']}")
    print(f"  dtype:     {record['dtype']} (vision tower: {record['vision_dtype']})")
    print(f"  record:    {plan.output / RECORD}")
    print(f"template: {plan.template}")
