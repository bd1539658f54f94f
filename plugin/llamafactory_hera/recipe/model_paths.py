"""The one check of model and adapter paths (every plugin stage's raw recipe, ``select``, ``eval``): a local path
with a typo would be taken for a hub id. Imports nothing heavy (``eval``'s errors load no library).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # name or organisation/name


def value_or_none(value: Any) -> Any:
    return None if value is None or str(value).strip().lower() in {"", "none", "null"} else value


def is_local_path(value: str) -> bool:
    """Whether a model value means a local folder: it exists, or cannot be a hub id (absolute, ``./``, ``~``, two
    slashes or more). A missing ``models/qwen`` is left to the hub (a local ``Qwen/`` folder beside a recipe naming
    ``Qwen/Qwen2.5-7B`` is common)."""
    return Path(value).expanduser().exists() or not _HUB_ID.match(value) or value.startswith((".", "~"))


def hub_folder(value: str, cache_dir: str | None) -> str | None:
    """Where the hub's cache holds a model's download (None: a local folder, nothing to download)."""
    if is_local_path(value):
        return None
    from huggingface_hub import constants  # lazy: this module imports nothing heavy (its docstring)

    return str(Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{value.replace('/', '--')}")


def _missing_path(key: str, value: str, started: str) -> str:
    path = Path(value).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    names = sorted(entry.name for entry in parent.iterdir() if entry.is_dir()) if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.5) if parent == path.parent else []
    far = parent not in (path.parent, Path("."), Path("/"))
    where = f"; {parent} has {', '.join(close)}" if close else f"; the nearest folder there is {parent}" if far else ""
    relative = "" if path.is_absolute() else f" (relative to the folder {started} starts in, {Path.cwd()})"
    return f"{key}: {value} is not a folder{relative} and not a Hugging Face model id (organisation/name){where}."


def check_model_paths(
    given: dict[str, Any], *, started: str = "the run", where: str = "", fix: str | None = None
) -> None:
    """``model_name_or_path`` is set; it and every local ``adapter_name_or_path`` is a folder, the model's holding
    ``config.json``. Reads no host default (``eval`` loads no library)."""
    model = value_or_none(given.get("model_name_or_path"))
    if model is None:
        raise RecipeError(
            f"{where}model_name_or_path: not set; a run trains a model. Set it to the model's folder or "
            "its Hugging Face id (e.g. Qwen/Qwen2.5-VL-7B-Instruct)."
        )
    adapters = value_or_none(given.get("adapter_name_or_path"))
    items = adapters if isinstance(adapters, list) else str(adapters or "").split(",")
    for key, value in [
        ("model_name_or_path", str(model).strip()),
        *(("adapter_name_or_path", str(item).strip()) for item in items if str(item).strip()),
    ]:
        holding = (
            "the model's config.json and weights"
            if key == "model_name_or_path"
            else "the adapter's adapter_config.json"
        )
        folder = Path(value).expanduser()
        if is_local_path(value) and not folder.exists():
            problem = _missing_path(key, value, started)
            own_fix = "Correct the path, or name a model id."
        elif folder.is_file():
            problem = f"{key}: {value} is a file, not a folder ({folder.absolute()})."
            own_fix = f"Point it at the folder holding {holding}, or name a model id."
        elif key == "model_name_or_path" and folder.is_dir() and not (folder / "config.json").is_file():
            problem = f"{key}: {value} is a folder without config.json, not a model's folder."
            own_fix = f"Point it at the folder holding {holding}."
        else:
            continue
        raise RecipeError(f"{where}{problem} {fix or own_fix}")
