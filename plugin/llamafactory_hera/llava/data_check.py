"""``llamafactory-hera data check RECIPE`` (docs/llava-data.md, "Checking the data")."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from llamafactory_hera.hera.selection.command import load_recipe
from llamafactory_hera.plots.heads import format_head_table
from llamafactory_hera.recipe.dataset_info import (
    MISSING,
    UNREADABLE,
    as_names,
    dataset_info,
    image_marks,
    image_problem,
)
from llamafactory_hera.recipe.parsed_checks import check_dataset_names
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.templates import image_placeholder
from llamafactory_hera_patches.tools.model_data import load_aligned_rows, parse_recipe

FIRST_PATHS = 10  # bad paths listed
IMAGE_CHUNK = 4096  # images handed to the threads at a time


@dataclass
class DatasetCounts:
    name: str
    rows: int = 0
    dropped_rows: int = 0  # broken turns: dropped when tokenizing
    text_only_rows: int = 0
    mismatched_rows: int = 0  # <image> marks != images: LLaMA-Factory raises
    usable_rows: int = 0  # >= 1 image, every image readable, marks matching
    images: int = 0  # distinct images
    bad_images: dict[str, str] = field(default_factory=dict)  # shown path -> MISSING or UNREADABLE
    images_per_row: Counter[int] = field(default_factory=Counter)
    first_mismatches: list[int] = field(default_factory=list)  # 0-based rows, up to FIRST_PATHS

    def count(self, status: str) -> int:
        return sum(1 for value in self.bad_images.values() if value == status)

    def table_row(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "rows": self.rows,
            "dropped": self.dropped_rows,
            "text-only": self.text_only_rows,
            "<image> mismatch": self.mismatched_rows,
            "usable by HeRA": self.usable_rows,
            "images": self.images,
            "missing": self.count(MISSING),
            "unreadable": self.count(UNREADABLE),
        }

    def histogram(self) -> str:
        return f"images per row ({self.name}): " + " · ".join(
            f"{n}: {rows:,}" for n, rows in sorted(self.images_per_row.items())
        )


def _file_path(image: Any) -> str | None:
    """The file an ``_images`` entry names; None for inline images."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and isinstance(image.get("path"), str) and not image.get("bytes"):
        return image["path"]
    return None


def _shown(path: str, media_dir: str, problem: str) -> str:
    """An image's path as the run opens it: LLaMA-Factory joins a relative path with ``media_dir`` only when that
    file exists, so a missing one is shown joined, where it was looked for."""
    if problem != MISSING or os.path.isabs(path):
        return path
    return os.path.join(media_dir, path)


def _aligned(rows: Any) -> Any:
    for batch in rows.select_columns(["_prompt", "_response", "_images"]).iter(batch_size=4096):
        yield from zip(batch["_prompt"], batch["_response"], batch["_images"], strict=True)


def check_images(paths: list[str], decode: bool, workers: int, desc: str) -> dict[str, str]:
    problems: dict[str, str] = {}
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar,
    ):  # None: on a terminal only
        for start in range(0, len(paths), IMAGE_CHUNK):  # chunks: not a future per image at once
            chunk = paths[start : start + IMAGE_CHUNK]
            for path, problem in zip(chunk, pool.map(lambda p: image_problem(p, decode), chunk), strict=True):
                if problem:
                    problems[path] = problem
            bar.update(len(chunk))
    return problems


def count_rows(name: str, rows: Any, placeholder: str, media_dir: str, decode: bool, workers: int) -> DatasetCounts:
    counts = DatasetCounts(name, rows=len(rows))
    image_rows: list[tuple[list[str], bool]] = []  # files, marks match
    for row, (prompt, response, images) in enumerate(
        tqdm(_aligned(rows), total=len(rows), desc=f"{name}: rows", unit="row", disable=None)
    ):
        images = images or []
        if not prompt or not response:
            counts.dropped_rows += 1
            continue
        counts.images_per_row[len(images)] += 1
        marks = image_marks(prompt + response, placeholder)
        if marks != len(images):
            counts.mismatched_rows += 1
            if len(counts.first_mismatches) < FIRST_PATHS:
                counts.first_mismatches.append(row)
        if images:
            image_rows.append(([path for path in map(_file_path, images) if path is not None], marks == len(images)))
        else:
            counts.text_only_rows += 1
    distinct = list(dict.fromkeys(path for paths, _ in image_rows for path in paths))  # in row order
    counts.images = len(distinct)
    problems = check_images(distinct, decode, workers, f"{name}: images ({'decode' if decode else 'stat'})")
    counts.bad_images = {_shown(path, media_dir, problem): problem for path, problem in problems.items()}
    counts.usable_rows = sum(
        1 for paths, marks_match in image_rows if marks_match and not any(path in problems for path in paths)
    )
    return counts


def _load(recipe_args: Any, seed: int, name: str, file_name: Any) -> Any:
    try:
        return load_aligned_rows(recipe_args, seed, [name])
    except DatasetGenerationError as err:
        cause = " ".join(str(err.__cause__ or err).split())
        raise RecipeError(
            f"dataset: {name}: LLaMA-Factory's loader cannot read its file_name {file_name} ({cause}). "
            "LLaVA's llava_v1_5_mix665k.json mixes string and integer ids: run `llamafactory-hera data "
            "convert` on it and name the written *.string_ids.json in dataset_info.json "
            "(docs/llava-data.md)."
        ) from None


def check_recipe(recipe_path: Path, decode: bool, workers: int) -> tuple[list[DatasetCounts], str]:
    if workers < 1:
        raise RecipeError(f"data check: --workers must be at least 1, got {workers}.")
    _, recipe = load_recipe(recipe_path)
    names = {key: as_names(recipe.get(key)) for key in ("dataset", "eval_dataset")}
    if not any(names.values()):
        raise RecipeError(
            f"dataset: {recipe_path} names no dataset; data check reads the datasets a recipe trains "
            "on. Add dataset: llava_pretrain_558k (stage 1) or llava_v1_5_mix665k (stage 2) with "
            "dataset_dir: recipes/data (docs/llava-data.md)."
        )
    recipe_args = parse_recipe({**recipe, "streaming": False})  # same rows, countable
    dataset_dir = str(recipe_args.data_args.dataset_dir)
    media_dir = str(recipe_args.data_args.media_dir)
    for key, keyed in names.items():
        check_dataset_names(key, keyed, dataset_dir)
    if not os.path.isdir(media_dir):
        default = "" if recipe.get("media_dir") else ", which defaults to dataset_dir"
        raise RecipeError(
            f"media_dir: {media_dir} is not a folder{default}; set media_dir to the folder LLaVA's "
            "image paths are relative to: recipes/data/llava/LLaVA-Pretrain/images for "
            "llava_pretrain_558k, recipes/data/llava for llava_v1_5_mix665k (docs/llava-data.md)."
        )
    info = dataset_info(dataset_dir, "dataset", names["dataset"] + names["eval_dataset"])
    seed = int(recipe.get("seed", 42) or 0)
    counts = []
    for name in dict.fromkeys(names["dataset"] + names["eval_dataset"]):
        rows = _load(recipe_args, seed, name, info[name].get("file_name") if isinstance(info[name], dict) else None)
        counts.append(count_rows(name, rows, image_placeholder(), media_dir, decode, workers))
    return counts, media_dir


def report(counts: list[DatasetCounts], media_dir: str, decode: bool) -> str:
    rows = [c.table_row() for c in counts]
    lines = [format_head_table(rows, list(rows[0])), *(c.histogram() for c in counts)]
    if any(c.text_only_rows for c in counts):
        lines.append(
            "text-only rows: HeRA trains them with the LM loss alone (they are never contrastive anchors); "
            "the run does not fail on them"
        )
    how = "opened, verified and decoded by PIL" if decode else "stat: exists, not empty (--verify-images decodes each)"
    lines.append(f"media_dir: {media_dir}; images checked by {how}")
    bad = [(status, path) for c in counts for path, status in c.bad_images.items()]
    if bad:
        lines.append(f"first missing or unreadable images ({min(len(bad), FIRST_PATHS)} of {len(bad)}):")
        lines.extend(f"  {status:<10}  {path}" for status, path in bad[:FIRST_PATHS])
    return "\n".join(lines)


def failure(counts: list[DatasetCounts]) -> str | None:
    bad = sum(len(c.bad_images) for c in counts)
    if not bad and not any(c.mismatched_rows for c in counts):
        return None
    parts = [f"{bad} images are missing or unreadable (listed above)"] if bad else []
    parts += [
        f"{c.name} has {c.mismatched_rows} rows whose <image> marks differ from their images (first rows: "
        f"{', '.join(map(str, c.first_mismatches))})"
        for c in counts
        if c.mismatched_rows
    ]
    return (
        f"data check: {'; '.join(parts)}; the run would stop at the first. Download the missing files "
        "(docs/llava-data.md), or remove those rows from the dataset."
    )
