"""Capture pooled per-head representations of selected heads during the model's forward.

A forward hook on each selected layer's ``o_proj`` copies the selected heads' slices of its input
(``[B, T, n*d_head]``; slicing and concatenation save no tensors for backward, so gradient
checkpointing's recomputation sees the same saved tensors with or without the hook). After the
forward, the slices are pooled over the chosen tokens and projected through each head's ``W_O``
columns, outside any checkpointed region, so the HeRA loss has a full autograd graph.
Hooks act only while armed: recomputation during backward and evaluation forwards are ignored.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from llamafactory_hera.anatomy.heads import AttentionGeometry, HeadRef
from llamafactory_hera.anatomy.pooling import IGNORE_INDEX, pooled_token_mask, pooling_weights
from llamafactory_hera.anatomy.projection import (
    find_o_proj_modules,
    is_partitioned,
    project_heads,
    project_heads_by_call,
)
from llamafactory_hera.short_errors import RecipeError

__all__ = ["HeadCapture", "IGNORE_INDEX", "pooled_token_mask", "pooling_weights"]


class HeadCapture:
    """Forward hooks that produce ``[n_heads, B, d]`` head representations for one forward pass."""

    def __init__(self, model: nn.Module, heads: list[HeadRef], geometry: AttentionGeometry) -> None:
        self.heads = list(heads)
        self.geometry = geometry
        o_projs = find_o_proj_modules(model)
        if len(o_projs) != geometry.num_layers:
            raise ValueError(f"model has {len(o_projs)} decoder layers but its config says {geometry.num_layers}")
        self._by_layer: dict[int, list[int]] = defaultdict(list)
        for ref in self.heads:
            self._by_layer[ref.layer].append(ref.head)
        self._modules = {layer: o_projs[layer] for layer in self._by_layer}
        self._armed = False
        self._inputs: dict[int, torch.Tensor] = {}
        self.fed_by_trainable = trainable_upstream(model, sorted(self._by_layer))
        self._handles = [self._modules[layer].register_forward_hook(self._make_hook(layer))
                         for layer in sorted(self._by_layer)]

    def _make_hook(self, layer: int):
        dh = self.geometry.head_dim
        slices = [slice(h * dh, (h + 1) * dh) for h in self._by_layer[layer]]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed:
                x = args[0]  # [B, T, H*dh]
                self._inputs[layer] = torch.cat([x[..., s] for s in slices], dim=-1)  # [B, T, n*dh], a copy

        return hook

    def arm(self) -> None:
        """Capture the next forward pass."""
        self._armed = True
        self._inputs = {}

    def _check_gradient_reaches(self, inputs: dict[int, torch.Tensor]) -> None:
        """Raise when a captured input carries no gradient although trainable parameters feed it (training only)."""
        cut = [layer for layer, x in sorted(inputs.items()) if self.fed_by_trainable[layer] and not x.requires_grad]
        if cut:
            raise RecipeError(
                f"HeRA: the o_proj input of layer(s) {cut} carries no gradient although trainable parameters feed "
                "it, so the HeRA gradient would reach only the selected heads' W_O columns. The forward ran without "
                "autograd: gradient checkpointing that runs it under torch.no_grad (use_unsloth_gc, or reentrant "
                "checkpointing) is the usual cause. Remove use_unsloth_gc / set use_reentrant_gc: false.")

    def disarm(self, weights: torch.Tensor, check_gradient: bool = False) -> torch.Tensor | None:
        """Stop capturing and build the representations.

        Args:
            weights: ``[B, T]`` float pooling weights (rows sum to 1, or 0 for samples without tokens).
            check_gradient: in a training step, raise if a captured input that trainable parameters feed
                carries no gradient (a silently cut HeRA gradient).

        Returns:
            ``[n_heads, B, d]`` float32 in recipe order, or None if no hook fired.
        """
        self._armed = False
        inputs, self._inputs = self._inputs, {}
        if not inputs:
            return None
        missing = sorted(set(self._by_layer) - set(inputs))
        if missing:
            raise RuntimeError(f"o_proj of layers {missing} did not run in this forward pass")
        if check_gradient:
            self._check_gradient_reaches(inputs)
        reps: dict[HeadRef, torch.Tensor] = {}
        for layer, x_heads in inputs.items():
            if x_heads.shape[:2] != weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x_heads.shape)} but the pooling mask is "
                    f"{tuple(weights.shape)}; the model changes the sequence length internally."
                )
            pooled = torch.einsum("bt,btc->bc", weights.to(x_heads.device, torch.float32), x_heads.float())
            heads = self._by_layer[layer]
            module = self._modules[layer]
            if is_partitioned(module):  # DeepSpeed ZeRO-3: let the module's hooks gather its weights
                projected = project_heads_by_call(module, pooled, heads, self.geometry.head_dim,
                                                  self.geometry.num_heads * self.geometry.head_dim)
            else:
                projected = project_heads(module, pooled, heads, self.geometry.head_dim)  # [n, B, d]
            reps.update({HeadRef(layer, h): rep for h, rep in zip(heads, projected, strict=True)})
        return torch.stack([reps[ref] for ref in self.heads])

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def trainable_upstream(model: nn.Module, layers: list[int]) -> dict[int, bool]:
    """For each decoder layer, whether a trainable parameter feeds its ``o_proj`` input.

    Upstream of layer l's ``o_proj``: everything outside the decoder layers (embeddings, vision tower,
    projector; the final norm and an untied ``lm_head`` excluded), the layers before l, and layer l's
    input norm and attention projections other than ``o_proj``.
    """
    from llamafactory_hera.anatomy.projection import text_decoder

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
