"""A recipe read as training reads it, before anything is counted: through training's checks (:func:`checked`), and
every key at training's default where the recipe leaves it (:func:`with_defaults`), so that a figure never rests on a
default of plan's own."""

from __future__ import annotations

import dataclasses
from typing import Any


def checked(recipe: dict) -> Any:
    """``recipe`` through training's checks before LLaMA-Factory parses it, this machine's aside (its engines, model
    paths, stack, bf16, the checkpoint it resumes from): the method's keys parsed and checked (heads named in a local
    model), every LLaMA-Factory key known and of its type, ``lora_target``. The method's arguments (None: a
    LLaMA-Factory stage)."""
    # lazy: the patches' checks before the parse import LLaMA-Factory's and transformers' pieces
    from llamafactory_hera.recipe.raw_checks import check_raw_recipe
    from llamafactory_hera_patches.recipe.arguments import keys_of, split_args
    from llamafactory_hera_patches.recipe.raw_checks import check_host_stage, start_run

    host, own, method = split_args(dict(recipe))
    if method is not None:
        return start_run(method, keys_of(method, own)[0], host, machine=False).args
    check_host_stage(host, {})
    check_raw_recipe(host, str(host.get("stage") or "sft"), machine=False)
    return None


def with_defaults(recipe: dict, method_args: Any) -> dict:
    """Every key of ``recipe`` as training reads it: LLaMA-Factory's keys at their argument classes' defaults where the
    recipe leaves them (``lora_alpha``: twice ``lora_rank``, as LLaMA-Factory sets it), the method's keys as its
    parser read them (``method_args``, its defaults included)."""
    from llamafactory_hera_patches.recipe.host_arguments import host_keys  # lazy: LLaMA-Factory's arguments

    keys = {name: key.default for name, key in host_keys().items()} | dict(recipe)
    if method_args is not None:
        keys |= {field.name: getattr(method_args, field.name) for field in dataclasses.fields(method_args)}
    if keys.get("lora_alpha") is None:
        keys["lora_alpha"] = 2 * int(keys.get("lora_rank") or 8)
    return keys
