"""``cutoff_len`` against the tokenized rows' image tokens, before the model loads: a row cut into its image tokens is
refused (docs/hera-design.md, "Bad image rows").
"""

from __future__ import annotations

from typing import Any

import datasets
import pyarrow.compute

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.templates import ignore_index, image_token_id, whole_row

SLACK = 2  # infer_seqlen's rounding may leave a truncated row this short of cutoff_len


def looks_cut(input_ids: list[int], labels: list[int], token: int, images: int, ignored: int) -> bool:
    """Whether a row's image tokens may be cut: fewer runs of ``token`` than ``images``, or the last run ends the row
    or meets a trained token (the truncated prompt's end)."""
    starts = [i for i, t in enumerate(input_ids) if t == token and (i == 0 or input_ids[i - 1] != token)]
    if len(starts) < images:
        return True
    end = max(i for i, t in enumerate(input_ids) if t == token) + 1
    return end == len(input_ids) or labels[end] != ignored


def _path(image: Any) -> Any:
    return image.get("path") if isinstance(image, dict) else image


def _aligned_row(index: int, image: Any, aligned: Any, rows: dict[str, int], tokenized_rows: int) -> int | None:
    """The aligned row of tokenized row ``index``: the same index if none was dropped, else the first row holding its
    first image."""
    if tokenized_rows == len(aligned) and _path((aligned[index]["_images"] or [None])[0]) == _path(image):
        return index
    return rows.get(_path(image)) if isinstance(_path(image), str) else None


def check_image_tokens(
    tokenized: Any,
    aligned: Any,
    rows: dict[str, int],
    template: Any,
    tokenizer_module: dict[str, Any],
    cutoff_len: int,
    data: str,
) -> None:
    """Refuse the first tokenized training row whose image tokens ``cutoff_len`` cut; ``aligned``: the rows before
    tokenization, found via ``rows`` (first image path -> aligned row)."""
    if (
        aligned is None
        or not isinstance(tokenized, datasets.Dataset)
        or not {"input_ids", "labels", "images"} <= set(tokenized.column_names)
    ):
        return  # streaming, or not supervised rows
    tokenizer = tokenizer_module["tokenizer"]
    token = image_token_id(template, tokenizer)
    if token is None:
        return
    lengths = pyarrow.compute.list_value_length(tokenized.with_format("arrow")["input_ids"]).to_numpy()  # no row read
    ignored = ignore_index()
    for index in (lengths >= cutoff_len - SLACK).nonzero()[0].tolist():
        row = tokenized[index]
        images = row["images"] or []
        if not images or not looks_cut(row["input_ids"], row["labels"], token, len(images), ignored):
            continue
        source = _aligned_row(index, images[0], aligned, rows, len(tokenized))
        if source is None or len(aligned[source]["_images"] or []) != len(images):
            continue  # no row found, or one with other images: its count would be wrong
        expected, length = whole_row(template, tokenizer, tokenizer_module.get("processor"), aligned[source])
        kept = row["input_ids"].count(token)
        if kept < expected:
            raise RecipeError(
                f"cutoff_len: {cutoff_len} cuts the image tokens of training dataset row {source} ({data}): its "
                f"{len(images)} image(s) take {expected} tokens and {kept} are left, so the model's image features "
                f"would not match its tokens. Raise cutoff_len to at least {length} (that row's length), or lower "
                "image_max_pixels."
            )
