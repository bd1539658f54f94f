"""What a LlamaBoard panel can read locally before a run; "unknown" (empty, None) where nothing is local."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig

from llamafactory_hera.heads.geometry import AttentionGeometry, attention_geometry
from llamafactory_hera.recipe.dataset_info import dataset_info
from llamafactory_hera.recipe.parsed_checks import NOT_LOCAL
from llamafactory_hera.runtime.errors import RecipeError


def _dataset_info(dataset_dir: Any) -> dict[str, Any] | None:
    if not dataset_dir or str(dataset_dir).startswith(NOT_LOCAL):
        return None
    try:
        return dataset_info(str(dataset_dir), "dataset", [])
    except RecipeError:
        return None


def dataset_names(dataset_dir: Any) -> list[str]:
    return list(_dataset_info(dataset_dir) or {})


def unknown_datasets(dataset_dir: Any, named: Mapping[str, Any]) -> dict[str, tuple[str, list[str]]]:
    info = _dataset_info(dataset_dir)
    if info is None:
        return {}
    return {key: (str(name), list(info)) for key, name in named.items() if str(name) not in info}


def local_text_config(model_path: Any) -> Any:
    """Readable offline (folder or HF cache), else None."""
    if not model_path or not str(model_path).strip():
        return None

    try:
        # a config needing the repository's code is refused, never run (nor asked about on a terminal)
        config = AutoConfig.from_pretrained(str(model_path).strip(), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not local, needs custom code, unreadable: the run checks it itself
        return None
    return config.get_text_config()


def local_text_depth(model_path: Any) -> int | None:
    depth = getattr(local_text_config(model_path), "num_hidden_layers", None)
    return depth if isinstance(depth, int) and depth > 0 else None


def local_attention_geometry(model_path: Any) -> AttentionGeometry | None:
    text = local_text_config(model_path)
    try:
        return None if text is None else attention_geometry(text)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):  # not a decoder config the run could use
        return None
