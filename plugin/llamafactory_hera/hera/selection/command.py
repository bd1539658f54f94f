"""``llamafactory-hera select RECIPE``: score, choose, write the recipe, the record and the heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
import yaml

from llamafactory_hera.heads.geometry import HeadRef, parse_head
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.hera.selection.recipe_write import (
    SelectionResult,
    check_folder_writable,
    check_writable,
    update_recipe,
    write_outputs,
)
from llamafactory_hera.hera.selection.select import SelectionOptions, run_selection, scoring_dtype
from llamafactory_hera.plots.heads import format_head_table
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import host_output_to, show
from llamafactory_hera.runtime.registry import method_for_stage
from llamafactory_hera_patches.tools.model_data import parse_recipe


def record_paths(recipe_path: Path) -> tuple[Path, ...]:
    """(JSON record, heatmap PNG, host's output log) beside a recipe."""
    stem = Path(recipe_path).with_suffix("")
    return tuple(Path(f"{stem}.hera_selection.{suffix}") for suffix in ("json", "png", "log"))


def load_recipe(path: Path) -> tuple[str, dict[str, Any]]:
    """The recipe's text and mapping; refuses a missing or non-mapping file."""
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = path.read_text(encoding="utf-8")
    mapping = yaml.safe_load(text)
    if not isinstance(mapping, dict):
        raise RecipeError(f"recipe {path} is not a YAML mapping of LLaMA-Factory keys")
    return text, mapping


def check_hera_recipe(path: Path, recipe: dict[str, Any]) -> None:
    """Refuse at once another method's recipe: ``select`` chooses ``hera_heads`` with HeRA's teacher."""
    method = method_for_stage(recipe.get("stage"))
    if method is not None and method.stage != "hera":
        raise RecipeError(
            f"stage: {recipe.get('stage')}: {path} is a {method.label} recipe, not a HeRA recipe (stage: "
            "hera); select chooses hera_heads for HeRA runs. Run it with `llamafactory-cli train "
            f"{path}`, or select on a recipe with stage: hera."
        )


def heads_table(heads: list[str] | list[HeadRef], result: SelectionResult) -> str:
    """``heads`` (names or parsed) with MKNN and rank (1 = least aligned), or "not in this model"."""
    rank = {row["head"]: i + 1 for i, row in enumerate(result.ranking)}
    rows = []
    for head in heads:
        ref = parse_head(head)
        inside = ref.layer < len(result.scores) and ref.head < len(result.scores[ref.layer])
        rows.append(
            {
                "head": str(head),
                "MKNN": result.scores[ref.layer][ref.head] if inside else "-",
                "rank": f"{rank[str(ref)]}/{len(rank)}" if inside else "not in this model",
            }
        )
    return format_head_table(rows, ["head", "MKNN", "rank"])


def run_select(args: Any) -> SelectionResult:
    _, recipe = load_recipe(args.recipe)
    check_hera_recipe(args.recipe, recipe)
    target = args.output or args.recipe
    if not args.dry_run:  # refuse before any heavy work
        check_writable(args.recipe, force=args.force, output=args.output)
    check_folder_writable(Path(target).resolve().parent, "the selection record and heatmap")
    # hera_* keys as the run parses them (hera_heads may be missing)
    hera = parse_hera_arguments({k: v for k, v in recipe.items() if k.startswith("hera_")}, require_heads=False)
    # as hera_heads: auto reads them: both choose alike
    seed = args.seed if args.seed is not None else int(recipe.get("seed", 42) or 0)
    options = SelectionOptions.from_keys(
        hera, args, seed=seed, device=args.device, dtype=getattr(args, "dtype", None) or scoring_dtype(recipe)
    )
    json_path, png_path, log_path = record_paths(target)
    with host_output_to(None if getattr(args, "verbose", False) else log_path):
        recipe_args = parse_recipe(recipe)
        transformers.utils.logging.set_verbosity_warning()  # the parser set INFO
        result, _ = run_selection(recipe_args, options)
        show(heads_table(result.selected, result))
        if isinstance(hera.hera_heads, list) and hera.hera_heads:  # an explicit list beside it
            show("the recipe's hera_heads:\n" + heads_table(hera.hera_heads, result))
        if not args.dry_run:
            written = update_recipe(args.recipe, result.selected, force=args.force, output=args.output)
            show(f"hera_heads: [{', '.join(result.selected)}] written to {written}")
        write_outputs(
            result,
            json_path,
            png_path,
            f"MKNN per head: {Path(str(recipe_args.model_args.model_name_or_path)).name} "
            f"({options.mode}, {result.num_pairs} pairs, k={options.k}); {options.strategy}-"
            f"{options.num_heads}",
        )
        show(f"record: {json_path}\nheatmap: {png_path}\n({result.duration_s:.1f} s)")
    return result
