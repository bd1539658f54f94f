"""The model as RAH-LoRA's calibration reads it, resolved once: head geometry, the calibratable decoder layers, those
left out and why, and the layers and projections calibrated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llamafactory_hera.heads.architecture import DecoderLayer, decoder_layers, describe, per_head_value_layers
from llamafactory_hera.heads.geometry import attention_geometry
from llamafactory_hera.rah.config import AUTO, RahArguments
from llamafactory_hera.runtime.errors import RecipeError


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class CalibrationPlan:
    """``modules``: layer index -> layer, calibratable ones; ``left_out``: the other asked layers -> why; ``dtype``: the
    model's, in which a quantized weight is read; ``layers`` / ``names``: layers calibrated, projections ("v", "o")."""

    geometry: Geometry
    modules: dict[int, DecoderLayer]
    left_out: dict[int, str]
    dtype: torch.dtype
    layers: list[int]
    names: tuple[str, ...]


def plan_calibration(model: nn.Module, args: RahArguments | None = None) -> CalibrationPlan:
    """``model``'s plan for ``args`` (default: defaults); ``rah_update: auto`` is V and O under MHA, O only under GQA
    (a V row block serves several query heads)."""
    args = args or RahArguments()
    shape = attention_geometry(model.config)
    layers = decoder_layers(model)
    kept, left = per_head_value_layers(layers, shape.head_dim)
    if not kept:
        raise RecipeError(
            f"{type(model).__name__}: no decoder layer has softmax self-attention whose heads own a "
            f"v_proj and an output projection Linear ({describe(layers)}); RAH-LoRA calibrates those "
            "projections per head."
        )
    text = model.config.get_text_config()
    kv = int(getattr(text, "num_key_value_heads", None) or shape.num_heads)
    modules = {index: layers[index] for index in kept}
    names = (
        tuple(name for name in ("v", "o") if name in args.rah_update)
        if args.rah_update != "auto"
        else ("v", "o")
        if kv == shape.num_heads
        else ("o",)
    )
    asked = args.layer_list(len(layers), kept)
    if args.rah_layers != AUTO:
        left = {layer: left[layer] for layer in asked if layer in left}
        asked = [layer for layer in asked if layer in modules]
    return CalibrationPlan(Geometry(shape.num_heads, kv, shape.head_dim), modules, left, model.dtype, asked, names)
