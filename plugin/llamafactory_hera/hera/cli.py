"""HeRA's verbs of ``llamafactory-hera``: ``select RECIPE`` and ``select --report RUN_DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from llamafactory_hera.hera.config import DTYPES, RECIPE_BACKED, HeraArguments
from llamafactory_hera.job_refusal import several_nodes
from llamafactory_hera.runtime.errors import RecipeError


def _field(key: str) -> Field:
    return next(f for f in fields(HeraArguments) if f.name == key)


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    select = commands.add_parser(
        "select",
        help="Rank every attention head by MKNN alignment with the teacher and write the chosen heads.",
        description="Rank every attention head (layer x head) by its MKNN alignment with the vision teacher on "
        "image-caption pairs of the recipe's dataset and write the chosen heads into the recipe as hera_heads. "
        "Model, adapter, template, dataset, teacher and k are read from the recipe. With --report RUN_DIR, score a "
        "trained run's heads before and after training instead.",
    )
    select.add_argument("recipe", nargs="?", type=Path, help="LLaMA-Factory training recipe (YAML)")
    select.add_argument(
        "--report",
        type=Path,
        metavar="RUN_DIR",
        help="a finished HeRA run's output_dir: before/after heatmaps and a delta table",
    )
    for flag, kind, key, what in RECIPE_BACKED:
        choices = _field(key).metadata.get("choices")
        options = {"choices": choices} if choices else {"type": kind}
        select.add_argument(
            flag, default=None, **options, help=f"{what} (default: the recipe's {key}, else {_field(key).default})"
        )
    select.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed (default: the recipe's seed, else 42, the Trainer's default, as hera_heads: auto uses)",
    )
    select.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    select.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="the model's dtype while scoring (default: the recipe's, or with --report the run's: "
        "bfloat16 with bf16: true or pure_bf16: true, float16 with fp16: true, else float32; pooled "
        "representations, teacher features and neighbours are float32 in every case)",
    )
    select.add_argument(
        "--dataset",
        default=None,
        help="comma-separated dataset names from the recipe's "
        "dataset_dir (default: the recipe's dataset; with --report, use held-out data here)",
    )
    select.add_argument("--output", type=Path, default=None, help="write a new recipe here instead of editing RECIPE")
    select.add_argument("--force", action="store_true", help="replace explicit hera_heads / an existing --output")
    select.add_argument("--dry-run", action="store_true", help="score and report, write no recipe")
    select.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="with --report: resamples of the pairs for each head's interval (default 1000; at least 100)",
    )
    select.add_argument(
        "--verbose",
        action="store_true",
        help="print the host's loading output (transformers, LLaMA-Factory, warnings) here; by default "
        "it goes to a log next to the outputs (RECIPE.hera_selection.log, RUN_DIR/hera_report.log)",
    )
    return {"select": run_select_verb}


def run_select_verb(args: argparse.Namespace) -> None:
    """``select``: a finished run's report (``--report``), else the selection written into the recipe."""
    if nodes := several_nodes():  # before anything loads
        raise RecipeError(
            f"{nodes}: llamafactory-hera select runs as one process on one node; launched on several "
            "nodes, each would score every head and write the recipe. Run it once, on one node."
        )
    check_device(args.device)
    if args.report is not None:
        from llamafactory_hera.hera.selection.report import run_report  # lazy: torch and the loaders

        run_report(args)
        return
    if args.recipe is None:
        raise RecipeError("select: give a RECIPE.yaml (or --report RUN_DIR).")
    from llamafactory_hera.hera.selection.command import run_select  # lazy: torch and the loaders

    run_select(args)


def check_device(device: str | None) -> None:
    """Refuse at once a ``--device`` this machine lacks (torch's error comes after data and teacher load)."""
    if device is None:
        return
    import torch  # lazy: the verb's --help loads no torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise RecipeError(
            f"--device {device}: not a device torch knows; give cuda, cuda:N or cpu (or leave it out: "
            "cuda when available, else cpu)."
        ) from None
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise RecipeError(
            f"--device {device}: no CUDA device is available here (no GPU or driver, or "
            "CUDA_VISIBLE_DEVICES hides them). Leave --device out (it takes the CPU here) or give "
            "--device cpu."
        )
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise RecipeError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; give one of them."
        )
