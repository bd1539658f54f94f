"""Checks of a recipe against the installed host stack, before LLaMA-Factory parses it (nothing loaded): a model family
whose transformers class the installed release lacks (LLaMA-Factory's loader would end in transformers' "does not
recognize this architecture" traceback), and a ``flash_attn`` value a known host bug breaks on this release; a
``quantization_bit`` measured wrong on this release is warned of. The releases and bugs are
:mod:`llamafactory_hera_patches.stacks`'."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamafactory_hera.log import say
from llamafactory_hera.recipe.model_paths import value_or_none
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches.stacks import TRANSFORMERS_SUPPORTED, family_too_new, host_bug, host_warning, installed


def model_type_of(source: str) -> str | None:
    """The ``model_type`` of a model folder's ``config.json`` (or of a hub id's cached config), None when unread."""
    config = Path(source).expanduser() / "config.json"
    try:
        if config.is_file():
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        # lazy: transformers only for a hub id (its cached config.json; no class needed for an unknown model_type)
        from transformers import PretrainedConfig

        return PretrainedConfig.get_config_dict(source)[0].get("model_type")
    except Exception:  # noqa: BLE001 - a config that cannot be read here is the model paths' or LLaMA-Factory's
        return None


def check_stack(given: dict[str, Any]) -> None:
    """``model_name_or_path``'s family is in the installed transformers; ``flash_attn`` is not broken on it; a
    ``quantization_bit`` measured wrong on it is said once (rank 0, or the launcher before torchrun starts ranks)."""
    found = installed()
    attention = value_or_none(given.get("flash_attn"))
    bug = host_bug(str(attention), found) if attention is not None else None
    if bug:
        raise RecipeError(f"flash_attn: {attention} on transformers {found}: {bug}")
    bits = value_or_none(given.get("quantization_bit"))
    warning = host_warning(bits, found) if bits is not None else None
    if warning and os.environ.get("RANK", "0") == "0" and not os.environ.get("LLAMAFACTORY_HERA_HOST_WARNED"):
        os.environ["LLAMAFACTORY_HERA_HOST_WARNED"] = "1"  # once per launch: the ranks torchrun starts inherit it
        say(f"warning: quantization_bit: {bits} on transformers {found}: {warning}")
    model = value_or_none(given.get("model_name_or_path"))
    model_type = model_type_of(str(model).strip()) if model is not None else None
    needed = family_too_new(model_type, found) if model_type else None
    if needed:
        raise RecipeError(
            f"model_name_or_path: {model} is a {model_type} model, which transformers {found} does not have (its class "
            f"came in transformers {needed}; docs/families.md). Install a newer one the plugin supports: "
            f"pip install 'transformers>={needed}' (supported: {TRANSFORMERS_SUPPORTED}; LLaMA-Factory 0.9.5 allows "
            "up to 5.6, its main up to 5.8).")
