"""A recipe against the installed host stack, before the parse (releases, families, bugs:
:mod:`llamafactory_hera_patches.stacks`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamafactory_hera.recipe.model_paths import value_or_none
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say_before_callbacks
from llamafactory_hera_patches.stacks import (
    FAMILY_REFUSED,
    TRANSFORMERS_SUPPORTED,
    family_too_new,
    host_bug,
    host_warning,
    installed,
)

WARNED = "LLAMAFACTORY_HERA_HOST_WARNED"  # set once the launch said its host warning: the ranks inherit it


def config_of(source: str) -> dict[str, Any]:
    config = Path(source).expanduser() / "config.json"
    try:
        if config.is_file():
            return json.loads(config.read_text(encoding="utf-8"))
        # lazy: transformers only for a hub id (no class needed for an unknown model_type)
        from transformers import PretrainedConfig

        return PretrainedConfig.get_config_dict(source)[0]
    except Exception:  # noqa: BLE001 - a config that cannot be read here is the model paths' or LLaMA-Factory's
        return {}


def host_warning_line(given: dict[str, Any]) -> str | None:
    """The warning for a bitsandbytes quantization (``quantization_bit`` or saved) measured wrong on the installed
    transformers; None when none is known."""
    found = installed()
    bits = value_or_none(given.get("quantization_bit"))
    method = str(value_or_none(given.get("quantization_method")) or "bnb").strip().lower()
    if bits is None or method not in {"bnb", "bitsandbytes"}:
        model = value_or_none(given.get("model_name_or_path"))
        saved = config_of(str(model).strip()).get("quantization_config") or {} if model is not None else {}
        bits = 8 if saved.get("quant_method") == "bitsandbytes" and saved.get("load_in_8bit") else None
        where = "the model saved 8-bit"
    else:
        where = f"quantization_bit: {bits}"
    warning = host_warning(bits, found) if bits is not None else None
    return f"warning: {where} on transformers {found}: {warning}" if warning else None


def check_stack(given: dict[str, Any]) -> None:
    """The model's family is in the installed transformers (else a "does not recognize this architecture"
    traceback) and run by the plugin; ``flash_attn`` is not broken on it; a quantization measured wrong is said once
    a launch (rank 0, or the launcher before the ranks start)."""
    found = installed()
    attention = value_or_none(given.get("flash_attn"))
    bug = host_bug(str(attention), found) if attention is not None else None
    if bug:
        raise RecipeError(f"flash_attn: {attention} on transformers {found}: {bug}")
    line = host_warning_line(given)
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    if line and rank == "0" and not os.environ.get(WARNED):
        os.environ[WARNED] = "1"
        say_before_callbacks(line)  # said again once the run's callbacks exist (LlamaBoard's log box)
    model = value_or_none(given.get("model_name_or_path"))
    model_type = config_of(str(model).strip()).get("model_type") if model is not None else None
    if model_type in FAMILY_REFUSED:
        raise RecipeError(
            f"model_name_or_path: {model} is a {model_type} model, which llamafactory-hera's stages do not run on: "
            f"{FAMILY_REFUSED[model_type]}. Train it with stage: sft, or choose a family of docs/families.md."
        )
    needed = family_too_new(model_type, found) if model_type else None
    if needed:
        raise RecipeError(
            f"model_name_or_path: {model} is a {model_type} model, which transformers {found} does not have (its class "
            f"came in transformers {needed}; docs/families.md). Install a newer one the plugin supports: "
            f"pip install 'transformers>={needed}' (supported: {TRANSFORMERS_SUPPORTED}; LLaMA-Factory 0.9.5 allows "
            "up to 5.6, its main up to 5.8)."
        )
