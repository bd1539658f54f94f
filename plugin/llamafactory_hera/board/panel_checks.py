"""What a LlamaBoard panel can read locally before a run starts: the datasets of the Data dir and a model's depth and
attention heads.

Both answer "unknown" (an empty list, None) where nothing can be read locally (no ``dataset_info.json``, a remote or
online dataset dir, a model neither on disk nor in the Hugging Face cache): the run checks the same things itself
when it starts, before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig

from llamafactory_hera.heads.geometry import AttentionGeometry, attention_geometry
from llamafactory_hera.recipe.dataset_info import dataset_info
from llamafactory_hera.recipe.parsed_checks import NOT_LOCAL
from llamafactory_hera.runtime.errors import RecipeError


def _dataset_info(dataset_dir: Any) -> dict[str, Any] | None:
    """``dataset_dir``'s dataset_info.json as a dict, None when it cannot be read locally."""
    if not dataset_dir or str(dataset_dir).startswith(NOT_LOCAL):
        return None
    try:
        return dataset_info(str(dataset_dir), "dataset", [])
    except RecipeError:
        return None


def dataset_names(dataset_dir: Any) -> list[str]:
    """The dataset names in ``dataset_dir``'s dataset_info.json, in file order (empty when unreadable)."""
    return list(_dataset_info(dataset_dir) or {})


def unknown_datasets(dataset_dir: Any, named: Mapping[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """key -> (name, the names listed) for each ``named`` dataset (key -> name) that ``dataset_dir`` does not list;
    empty when its dataset_info.json cannot be read."""
    info = _dataset_info(dataset_dir)
    if info is None:
        return {}
    return {key: (str(name), list(info)) for key, name in named.items() if str(name) not in info}


def local_text_config(model_path: Any) -> Any:
    """The text config of ``model_path`` (a folder or a Hugging Face id) where its config can be read without the
    network (the folder, or the Hugging Face cache); None otherwise."""
    if not model_path or not str(model_path).strip():
        return None

    try:
        # trust_remote_code=False: a config that needs the repository's code is refused at once, never run (nor
        # asked about on a terminal)
        config = AutoConfig.from_pretrained(str(model_path).strip(), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not local, needs custom code, unreadable: the run checks it itself
        return None
    return config.get_text_config()


def local_text_depth(model_path: Any) -> int | None:
    """``num_hidden_layers`` of the text config of ``model_path`` where it can be read locally
    (:func:`local_text_config`); None otherwise."""
    depth = getattr(local_text_config(model_path), "num_hidden_layers", None)
    return depth if isinstance(depth, int) and depth > 0 else None


def local_attention_geometry(model_path: Any) -> AttentionGeometry | None:
    """The text decoder's layers and heads (:func:`~llamafactory_hera.heads.geometry.attention_geometry`) of
    ``model_path`` where its config can be read locally (:func:`local_text_config`); None otherwise."""
    text = local_text_config(model_path)
    try:
        return None if text is None else attention_geometry(text)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):  # not a decoder config the run could use
        return None
