"""HeRA's checks before LLaMA-Factory parses the recipe (nothing loaded; also before torchrun starts the ranks). Run
by its run (``recipe/run.py``, phase 1); after the parse: :mod:`.parsed_checks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from llamafactory_hera.heads.geometry import attention_geometry, check_heads_fit
from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy


def validate_raw_host_args(host_args: dict[str, Any] | list[str], hera_args: HeraArguments) -> None:
    """Refuse DeepSpeed with fp16 and a learned temperature, and named heads outside a local model."""
    if raw_value(host_args, "deepspeed") and truthy(raw_value(host_args, "fp16")) and hera_args.hera_learn_temperature:
        raise RecipeError(
            "stage: hera cannot learn the temperature under DeepSpeed with fp16: true (the temperature's "
            "own optimizer would step on loss-scaled gradients and would not skip overflow steps). Use "
            "bf16: true, or set hera_learn_temperature: false."
        )
    check_heads_before_parse(host_args, hera_args)


def check_heads_before_parse(host_args: dict[str, Any] | list[str], hera_args: HeraArguments) -> None:
    """Named ``hera_heads`` against a local model's ``config.json``; under torchrun this runs before the ranks start
    (``llamafactory_hera_patches.launch``), so a head out of range starts none. Hub ids, folders without
    ``config.json`` and unreadable configs are checked after the parse (:func:`validate_host_args`)."""
    model = raw_value(host_args, "model_name_or_path")
    if hera_args.auto_heads or not model or not (Path(str(model)).expanduser() / "config.json").is_file():
        return
    remote = truthy(raw_value(host_args, "trust_remote_code"))
    try:
        config = AutoConfig.from_pretrained(str(Path(str(model)).expanduser()), trust_remote_code=remote)
    except Exception:  # a config this transformers cannot read: the parse's checks name it
        return
    check_heads_fit(hera_args.hera_heads, attention_geometry(config), str(model))
