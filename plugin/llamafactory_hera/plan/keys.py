"""A recipe read as training reads it, so no figure rests on a default of plan's own."""

from __future__ import annotations

import dataclasses
from typing import Any


def checked(recipe: dict) -> Any:
    """``recipe`` through training's pre-parse checks but this machine's; the method's arguments (None: none)."""
    # lazy: these import LLaMA-Factory's and transformers' pieces
    from llamafactory_hera.recipe.raw_checks import check_raw_recipe
    from llamafactory_hera_patches.recipe.arguments import keys_of, split_args
    from llamafactory_hera_patches.recipe.raw_checks import check_host_stage, checked_run

    host, own, method = split_args(dict(recipe))
    if method is not None:
        return checked_run(method, keys_of(method, own)[0], host, machine=False).args
    check_host_stage(host, {})
    check_raw_recipe(host, str(host.get("stage") or "sft"), machine=False)
    return None


def with_defaults(recipe: dict, method_args: Any) -> dict:
    """Every key as training reads it (``lora_alpha``: twice ``lora_rank``, as LLaMA-Factory sets it)."""
    from llamafactory_hera_patches.recipe.host_arguments import host_keys  # lazy: LLaMA-Factory's arguments

    keys = {name: key.default for name, key in host_keys().items()} | dict(recipe)
    if method_args is not None:
        keys |= {field.name: getattr(method_args, field.name) for field in dataclasses.fields(method_args)}
    if keys.get("stage") == "harc" and recipe.get("per_device_train_batch_size") is None:
        keys["per_device_train_batch_size"] = 1  # HARC's: one composed micro-batch a device step (harc/raw_checks.py)
    if keys.get("lora_alpha") is None:
        keys["lora_alpha"] = 2 * int(keys.get("lora_rank") or 8)
    return keys
