"""The image files of a dataset's rows, checked before a model loads (HeRA's training rows, RAH-LoRA's calibration
rows): a missing file is one line naming it and its row, where the host's preprocessing would end in a bare
``FileNotFoundError`` after the model loaded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from llamafactory_hera.short_errors import RecipeError


def image_rows(dataset: Any, column: str = "images", check_files: bool = True,
               only: Iterable[int] | None = None) -> dict[str, int]:
    """Map every image path of a (map-style) dataset's image column to its first row index; with ``check_files``,
    also check that each file exists (ranks other than the main one skip it: the main process checked them).
    ``only``: the rows to read (default: every row).

    Raises:
        RecipeError: naming the first missing image file and its dataset row.
    """
    rows: dict[str, int] = {}
    if dataset is None or not hasattr(dataset, "column_names") or column not in dataset.column_names:
        return rows
    values = dataset[column]
    for row in range(len(values)) if only is None else only:
        for image in values[row] or ():
            path = image.get("path") if isinstance(image, dict) else image
            if not isinstance(path, str):
                continue
            if check_files and not os.path.isfile(path):
                raise RecipeError(f"image {path!r} of training dataset row {row} does not exist; fix the path "
                                  "in the dataset (or media_dir) or remove the row")
            rows.setdefault(path, row)
    return rows


def describe_image(image: Any, rows: dict[str, int]) -> str:
    """``'path' (training dataset row N)`` for error messages."""
    path = image.get("path") if isinstance(image, dict) else image
    if isinstance(path, str):
        row = rows.get(path)
        return f"{path!r}" + (f" (training dataset row {row})" if row is not None else "")
    return f"an in-memory image of type {type(image).__name__}"
