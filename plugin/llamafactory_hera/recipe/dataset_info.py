"""A recipe's datasets as LLaMA-Factory registers them, and their rows' images, checked before a model loads (HeRA's
training rows, RAH-LoRA's calibration rows): a missing or undecodable file, or a row whose ``<image>`` marks differ in
number from its images, is one line naming the file or row, where the host would raise a bare ``FileNotFoundError``,
``OSError: Truncated File Read`` or ``ValueError`` naming neither.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

DATA_CONFIG = "dataset_info.json"
MISSING = "missing"
UNREADABLE = "unreadable"
ROWS_READ_AT_ONCE = 4096


def as_names(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def dataset_info(dataset_dir: str, key: str, names: list[str]) -> dict[str, Any]:
    """``dataset_dir``'s ``dataset_info.json`` (errors name ``key`` and ``names``)."""
    path = Path(dataset_dir) / DATA_CONFIG
    if not path.is_file():
        raise RecipeError(
            f"{key}: {', '.join(names)} must be listed in {path}, which does not exist (dataset_dir: "
            f"{dataset_dir}). Set dataset_dir to the folder holding {DATA_CONFIG}."
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"dataset_dir: {path} cannot be read as JSON ({err}); fix the file.") from None
    if not isinstance(info, dict):
        raise RecipeError(f"dataset_dir: {path} is not a JSON object of dataset names; fix the file.")
    return info


def describe_data(data_args: Any) -> str:
    """The training datasets as errors about a row name them (``NAME: FILE`` for one local dataset)."""
    names = as_names(getattr(data_args, "dataset", None))
    if len(names) == 1:
        try:
            entry = dataset_info(str(data_args.dataset_dir), "dataset", names).get(names[0])
        except RecipeError:
            entry = None
        if isinstance(entry, dict) and entry.get("file_name"):
            return f"{names[0]}: {os.path.join(str(data_args.dataset_dir), entry['file_name'])}"
    return f"dataset: {names[0]}" if len(names) == 1 else f"datasets {', '.join(names)}: rows counted in that order"


def image_problem(path: str, decode: bool) -> str | None:
    """None if ``path`` reads, else :data:`MISSING` or :data:`UNREADABLE` (empty, or with ``decode`` undecodable: a
    truncated file opens and fails on its pixels)."""
    try:
        info = os.stat(path)
    except OSError:
        return MISSING
    if not stat.S_ISREG(info.st_mode):
        return MISSING
    if info.st_size == 0:
        return UNREADABLE
    if decode:
        from PIL import Image  # lazy: only where images are decoded

        try:
            with Image.open(path) as image:
                image.verify()  # structure and checksums; the image cannot be used after it
            with Image.open(path) as image:
                image.load()  # the pixels (PIL's decompression-bomb limit guards the size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return UNREADABLE
    return None


def image_marks(messages: Iterable[dict[str, Any]], placeholder: str) -> int:
    return sum(str(message.get("content") or "").count(placeholder) for message in messages)


def _rows(dataset: Any, columns: list[str], only: Iterable[int] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    table = dataset.select_columns(columns)
    if only is not None:
        for row in only:
            yield row, table[row]
        return
    row = 0
    for batch in table.iter(batch_size=ROWS_READ_AT_ONCE):
        for values in zip(*(batch[column] for column in columns), strict=True):
            yield row, dict(zip(columns, values, strict=True))
            row += 1


def image_rows(
    dataset: Any,
    column: str = "images",
    check_files: bool = True,
    only: Iterable[int] | None = None,
    *,
    placeholder: str | None = None,
    decode: bool = False,
    data: str | None = None,
) -> dict[str, int]:
    """Image path -> first row, raising on the first failure: ``check_files``, each file exists (main process only);
    ``decode``, PIL decodes it; ``placeholder``, each aligned row holds one mark per image."""
    rows: dict[str, int] = {}
    if dataset is None or not hasattr(dataset, "column_names") or column not in dataset.column_names:
        return rows
    of = f" ({data})" if data else ""
    marked = placeholder is not None and {"_prompt", "_response"} <= set(dataset.column_names)
    for row, values in _rows(dataset, [column, "_prompt", "_response"] if marked else [column], only):
        images = values[column] or []
        valid = marked and len(values["_prompt"]) % 2 == 1 and len(values["_response"]) == 1  # else the host drops it
        if valid and (marks := image_marks(values["_prompt"] + values["_response"], placeholder)) != len(images):
            raise RecipeError(
                f"training dataset row {row}{of} has {len(images)} image(s) and {marks} {placeholder} "
                f"mark(s) in its messages; LLaMA-Factory needs one mark per image, where the image "
                "goes: add or remove marks (or images) in that row, or remove the row"
            )
        for image in images:
            path = image.get("path") if isinstance(image, dict) else image
            if not isinstance(path, str):
                continue
            if check_files and path not in rows and (problem := image_problem(path, decode)):
                what = (
                    "does not exist; fix the path in the dataset (or media_dir)"
                    if problem == MISSING
                    else ("cannot be decoded (truncated or not an image); replace the file")
                )
                raise RecipeError(f"image {path!r} of training dataset row {row}{of} {what} or remove the row")
            rows.setdefault(path, row)
    return rows


def first_unreadable(rows: dict[str, int], data: str | None = None) -> str | None:
    """The refusal naming the first of ``rows``' images PIL cannot decode, else None: for PIL's ``Truncated File
    Read``, which names no file."""
    of = f" ({data})" if data else ""
    for path, row in rows.items():
        if image_problem(path, decode=True) is not None:
            return (
                f"image {path!r} of training dataset row {row}{of} cannot be decoded (truncated or not an "
                "image); replace the file or remove the row"
            )
    return None
