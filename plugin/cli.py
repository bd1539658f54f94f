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
    select.add_argument("--samples", type=int, default=None,
                        help="image-caption pairs to score on (default: the recipe's hera_select_samples, else 1000)")
    select.add_argument("--heads", type=int, default=None,
                        help="number of heads to choose (default: the recipe's hera_select_num_heads, else 5)")
    select.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="worst: least aligned (paper); best / random: ablations (default: the recipe's "
                        "hera_select_strategy, else worst)")
    select.add_argument("--mode", choices=MODES, default=None,
                        help="text: captions alone through the language model (paper); multimodal: image + caption "
                        "through the MLLM (default: the recipe's hera_select_mode, else text)")
    select.add_argument("--clamp", type=float, default=None,
                        help="PRH's outlier clamp: feature values clamped at this quantile of |value| before "
                        "normalising, both sides; 0 turns it off (default: the recipe's hera_select_clamp, else 0.95)")
    select.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: the recipe's seed, else 42, the Trainer's default, as "
                        "hera_heads: auto uses)")
    select.add_argument("--batch-size", type=int, default=None,
                        help="forward batch size (default: the recipe's hera_select_batch_size, else 16)")
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
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"llamafactory-hera: error: {err}", file=sys.stderr)
        return 2
    return 0


def options_from(args: Any, recipe: dict[str, Any]) -> Any:
    """SelectionOptions from the command line, falling back to the recipe's hera_* keys (the same keys
    ``hera_heads: auto`` reads, so both choose the same heads for the same recipe)."""
    from .args import parse_hera_arguments
    from .selection.select import SelectionOptions

    hera = parse_hera_arguments({k: v for k, v in recipe.items() if k.startswith("hera_")}, require_heads=False)
    def pick(flag: Any, key: str) -> Any:
        return flag if flag is not None else getattr(hera, key)

    return SelectionOptions(
        num_samples=pick(args.samples, "hera_select_samples"), num_heads=pick(args.heads, "hera_select_num_heads"),
        strategy=pick(args.strategy, "hera_select_strategy"), mode=pick(args.mode, "hera_select_mode"),
        seed=args.seed if args.seed is not None else int(recipe.get("seed", 42) or 0),
        batch_size=pick(args.batch_size, "hera_select_batch_size"),
        device=args.device, k=pick(args.k, "hera_k"), teacher=args.teacher or hera.hera_teacher,
        teacher_feature=hera.hera_teacher_feature, clamp=pick(args.clamp, "hera_select_clamp"),
        dataset=[d.strip() for d in args.dataset.split(",")] if args.dataset else None,
    )


if __name__ == "__main__":
    raise SystemExit(main())
