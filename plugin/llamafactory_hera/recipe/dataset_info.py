"""A recipe's datasets as LLaMA-Factory registers them: their names (:func:`as_names`), the ``dataset_info.json`` of
``dataset_dir`` (:func:`dataset_info`) and a run's data named for an error about one of its rows
(:func:`describe_data`). Read by the checks and by the runs' image checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamafactory_hera.short_errors import RecipeError

DATA_CONFIG = "dataset_info.json"


def as_names(value: Any) -> list[str]:
    """A recipe's dataset value (``a,b``, a list or None) as names."""
    if not value:
        return []
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def dataset_info(dataset_dir: str, key: str, names: list[str]) -> dict[str, Any]:
    """``dataset_dir``'s ``dataset_info.json`` (errors name ``key`` and ``names``, which need it)."""
    path = Path(dataset_dir) / DATA_CONFIG
    if not path.is_file():
        raise RecipeError(f"{key}: {', '.join(names)} must be listed in {path}, which does not exist (dataset_dir: "
                          f"{dataset_dir}). Set dataset_dir to the folder holding {DATA_CONFIG}.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"dataset_dir: {path} cannot be read as JSON ({err}); fix the file.") from None
    if not isinstance(info, dict):
        raise RecipeError(f"dataset_dir: {path} is not a JSON object of dataset names; fix the file.")
    return info


def describe_data(data_args: Any) -> str:
    """``NAME: FILE`` for errors naming a row: the training datasets, the file of a single local one."""
    names = as_names(getattr(data_args, "dataset", None))
    if len(names) == 1:
        try:
            entry = dataset_info(str(data_args.dataset_dir), "dataset", names).get(names[0])
        except RecipeError:
            entry = None
        if isinstance(entry, dict) and entry.get("file_name"):
            return f"{names[0]}: {os.path.join(str(data_args.dataset_dir), entry['file_name'])}"
    return f"dataset: {names[0]}" if len(names) == 1 else f"datasets {', '.join(names)}: rows counted in that order"
