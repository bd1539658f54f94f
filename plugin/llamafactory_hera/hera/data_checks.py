"""Checks of a HeRA run's inputs that need the data or the adapter files, with errors that name the culprit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamafactory_hera.short_errors import RecipeError


def image_rows(dataset: Any, column: str = "images", check_files: bool = True) -> dict[str, int]:
    """Map every image path of a (map-style) dataset's image column to its first row index; with ``check_files``,
    also check that each file exists (ranks other than the main one skip it: the main process checked them).

    Raises:
        FileNotFoundError: naming the first missing image file and its dataset row.
    """
    rows: dict[str, int] = {}
    if dataset is None or not hasattr(dataset, "column_names") or column not in dataset.column_names:
        return rows
    for row, images in enumerate(dataset[column]):
        for image in images or ():
            path = image.get("path") if isinstance(image, dict) else image
            if not isinstance(path, str):
                continue
            if check_files and not os.path.isfile(path):
                raise RecipeError(f"image {path!r} of training dataset row {row} does not exist; fix the path "
                                  "in the dataset (or media_dir) or remove the row")
            rows.setdefault(path, row)
    return rows


def describe_image(image: Any, rows: dict[str, int]) -> str:
    """``'path' (dataset row N)`` for error messages."""
    path = image.get("path") if isinstance(image, dict) else image
    if isinstance(path, str):
        row = rows.get(path)
        return f"{path!r}" + (f" (training dataset row {row})" if row is not None else "")
    return f"an in-memory image of type {type(image).__name__}"


def check_adapter_fits(adapters: list[str] | None, hidden_size: int, attention_width: int, model_name: str) -> None:
    """Raise when an adapter's LoRA matrices cannot belong to this base model (shapes checked, no weights loaded).

    Args:
        adapters: ``adapter_name_or_path`` entries (local folders are checked, hub ids skipped).
        hidden_size: the text model's width d.
        attention_width: ``num_heads * head_dim`` (input width of o_proj, output width of q_proj).
    """
    from safetensors import safe_open

    for adapter in adapters or []:
        weights = Path(adapter) / "adapter_model.safetensors"
        if not weights.is_file():
            continue
        config = json.loads((Path(adapter) / "adapter_config.json").read_text()) if (
            Path(adapter) / "adapter_config.json").is_file() else {}
        with safe_open(str(weights), "pt") as handle:
            for name in handle.keys():
                if ".self_attn.o_proj.lora_A" in name and handle.get_slice(name).get_shape()[1] != attention_width:
                    raise RecipeError(
                        f"adapter_name_or_path: {adapter} was trained on another base model (its o_proj LoRA expects "
                        f"inputs of width {handle.get_slice(name).get_shape()[1]}, {model_name} has {attention_width}; "
                        f"the adapter's base is {config.get('base_model_name_or_path', 'unknown')}). Use an adapter of "
                        "this base model.")
                if ".self_attn.o_proj.lora_B" in name and handle.get_slice(name).get_shape()[0] != hidden_size:
                    raise RecipeError(f"adapter_name_or_path: {adapter} was trained on another base model (o_proj "
                                      f"output width {handle.get_slice(name).get_shape()[0]}, {model_name} has "
                                      f"{hidden_size}). Use an adapter of this base model.")
