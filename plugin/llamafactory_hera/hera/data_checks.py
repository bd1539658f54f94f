"""Checks of a HeRA run's adapter files against its base model, with errors that name the culprit (the image files of
its data: :mod:`llamafactory_hera.recipe.image_files`)."""

from __future__ import annotations

import json
from pathlib import Path

from llamafactory_hera.short_errors import RecipeError


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
