"""``llamafactory-hera``: the plugin's command line.

    llamafactory-hera select RECIPE.yaml [options]     score every head by MKNN, write hera_heads into the recipe
    llamafactory-hera select --report RUN_DIR [opts]   score a trained run's heads before/after training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .selection.select import MODES, STRATEGIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamafactory-hera", description="HeRA tools for LLaMA-Factory.")
    commands = parser.add_subparsers(dest="command", required=True)
    select = commands.add_parser(
        "select", help="Rank every attention head by MKNN alignment with the teacher and write the chosen heads.",
        description="Rank every attention head (layer x head) by its MKNN alignment with the vision teacher on "
        "image-caption pairs of the recipe's dataset and write the chosen heads into the recipe as hera_heads. "
        "Model, adapter, template, dataset, teacher and k are read from the recipe. With --report RUN_DIR, score a "
        "trained run's heads before and after training instead.")
    select.add_argument("recipe", nargs="?", type=Path, help="LLaMA-Factory training recipe (YAML)")
    select.add_argument("--report", type=Path, metavar="RUN_DIR",
                        help="a finished HeRA run's output_dir: before/after heatmaps and a delta table")
    select.add_argument("--samples", type=int, default=1000, help="image-caption pairs to score on (default 1000)")
    select.add_argument("--heads", type=int, default=5, help="number of heads to choose (default 5)")
    select.add_argument("--strategy", choices=STRATEGIES, default="worst",
                        help="worst: least aligned (paper, default); best / random: ablations")
    select.add_argument("--mode", choices=MODES, default="text",
                        help="text: captions alone through the language model (paper, default); "
                        "multimodal: image + caption through the MLLM")
    select.add_argument("--seed", type=int, default=None, help="sampling seed (default: the recipe's seed, else 0)")
    select.add_argument("--batch-size", type=int, default=16, help="forward batch size (default 16)")
    select.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    select.add_argument("--k", type=int, default=None, help="neighbours for MKNN (default: the recipe's hera_k, "
                        "else 10)")
    select.add_argument("--teacher", default=None, help="vision teacher (default: the recipe's hera_teacher, else "
                        "facebook/dinov2-large)")
    select.add_argument("--dataset", default=None, help="comma-separated dataset names from the recipe's "
                        "dataset_dir (default: the recipe's dataset; with --report, use held-out data here)")
    select.add_argument("--output", type=Path, default=None, help="write a new recipe here instead of editing RECIPE")
    select.add_argument("--force", action="store_true", help="replace explicit hera_heads / an existing --output")
    select.add_argument("--dry-run", action="store_true", help="score and report, write no recipe")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llamafactory-hera`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.report is not None:
            from .selection.report import run_report

            run_report(args)
        else:
            if args.recipe is None:
                raise ValueError("select: give a RECIPE.yaml (or --report RUN_DIR).")
            from .selection.command import run_select

            run_select(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"llamafactory-hera: error: {err}", file=sys.stderr)
        return 2
    return 0


def options_from(args: Any, recipe: dict[str, Any]) -> Any:
    """SelectionOptions from the command line, falling back to the recipe's hera_* keys."""
    from .args import parse_hera_arguments
    from .selection.select import SelectionOptions

    hera = parse_hera_arguments({k: v for k, v in recipe.items() if k.startswith("hera_")}, require_heads=False)
    return SelectionOptions(
        num_samples=args.samples, num_heads=args.heads, strategy=args.strategy, mode=args.mode,
        seed=args.seed if args.seed is not None else int(recipe.get("seed", 0) or 0), batch_size=args.batch_size,
        device=args.device, k=args.k if args.k is not None else hera.hera_k,
        teacher=args.teacher or hera.hera_teacher, teacher_feature=hera.hera_teacher_feature,
        dataset=[d.strip() for d in args.dataset.split(",")] if args.dataset else None,
    )


if __name__ == "__main__":
    raise SystemExit(main())
