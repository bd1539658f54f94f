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

from .heads import AttentionGeometry, HeadRef
from .pooling import IGNORE_INDEX, pooled_token_mask, pooling_weights
from .projection import find_o_proj_modules, is_partitioned, project_heads, project_heads_by_call

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

    def disarm(self, weights: torch.Tensor) -> torch.Tensor | None:
        """Stop capturing and build the representations.

        Args:
            weights: ``[B, T]`` float pooling weights (rows sum to 1, or 0 for samples without tokens).

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
