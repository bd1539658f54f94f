"""Refuse a HeRA run whose heads no trainable weight can move (``freeze`` or ``lora_target`` limited to later
layers, a frozen language model without a trained projector): only the temperature would move while ``hera_loss``
is logged as if it worked. Checked once the model is loaded, before the first step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llamafactory_hera.heads.geometry import HeadRef
from llamafactory_hera.heads.projection import find_o_proj_modules, text_decoder
from llamafactory_hera.short_errors import RecipeError


def trainable_upstream(model: nn.Module, layers: list[int]) -> dict[int, bool]:
    """For each decoder layer, whether a trainable parameter feeds its ``o_proj`` input.

    Upstream of layer l's ``o_proj``: everything outside the decoder layers (embeddings, vision tower,
    projector; the final norm and an untied ``lm_head`` excluded), the layers before l, and layer l's
    input norm and attention projections other than ``o_proj``.
    """
    decoder = text_decoder(model)
    decoder_layers = list(decoder.layers)
    in_layers = {id(p) for layer in decoder_layers for p in layer.parameters()}
    after = {id(p) for p in getattr(decoder, "norm", nn.Identity()).parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_ids = {id(p) for p in inputs.parameters()} if inputs is not None else set()
    if output is not None:
        after |= {id(p) for p in output.parameters() if id(p) not in input_ids}  # tied weights feed the input
    outside = any(p.requires_grad for p in model.parameters() if id(p) not in in_layers and id(p) not in after)
    result: dict[int, bool] = {}
    for index in layers:
        earlier = any(p.requires_grad for layer in decoder_layers[:index] for p in layer.parameters())
        own = any(p.requires_grad for name, p in decoder_layers[index].named_parameters()
                  if (name.startswith("self_attn.") and not name.startswith("self_attn.o_proj."))
                  or name.startswith("input_layernorm."))
        result[index] = outside or earlier or own
    return result


def trainable_layers(model: nn.Module) -> list[int]:
    """Decoder layers whose heads the recipe can train: their ``o_proj`` trains, or a trainable parameter feeds it."""
    o_projs = find_o_proj_modules(model)
    fed = trainable_upstream(model, list(range(len(o_projs))))
    return [layer for layer, o_proj in enumerate(o_projs)
            if fed[layer] or any(p.requires_grad for p in o_proj.parameters())]


def check_heads_train(model: nn.Module, heads: list[HeadRef], auto: bool, finetuning_args: Any = None) -> None:
    """Refuse, naming the heads no trainable parameter can move, and the fix."""
    layers = trainable_layers(model)
    stuck = [ref for ref in heads if ref.layer not in layers]
    if not stuck:
        return
    def listed(refs: list[HeadRef]) -> str:
        return "[" + ", ".join(str(ref) for ref in refs) + "]"

    finetuning = getattr(finetuning_args, "finetuning_type", None)
    how = {"freeze": "raise freeze_trainable_layers to cover them (a negative value, e.g. -N, trains the first N "
                     "layers; a positive N the last N)",
           "lora": "add those layers' o_proj to lora_target (or use lora_target: all)"}.get(
        str(finetuning), "unfreeze those layers (freeze_language_model: false)")
    where = f"layers {layers}" if layers else "no layer (nothing in or before the language model trains)"
    which = f"hera_heads: auto selected {listed(heads)}; {listed(stuck)} of them" if auto else \
        f"hera_heads: {listed(stuck)}"
    choose = "list heads of those layers in hera_heads" if auto else "choose heads there"
    raise RecipeError(
        f"{which} cannot train under this recipe (finetuning_type: {finetuning}): their layer's o_proj is frozen and "
        f"no trainable parameter feeds its input, so HeRA would move only the temperature. The recipe trains heads in "
        f"{where}: {how}, or {choose}.")
