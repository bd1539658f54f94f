"""The heads' inputs captured in the LM forward (:class:`HeadCapture`, steps 2-3 of the HeRA step) and, under
DeepSpeed ZeRO-3, the heads' columns of ``o_proj``'s weights read in the modules' own calls (:class:`InCallColumns`):
a ZeRO-3 parameter is whole only inside its module's call, so while the capture is armed, hooks copy the heads'
columns while ZeRO-3 holds each weight whole, with their gradient back to the partitioned parameters
(:class:`_CopyWithGradient`); the HeRA step then gathers nothing of its own (docs/hera-design.md, "ZeRO-3").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import head_projections, trainable_upstream
from llamafactory_hera.heads.geometry import AttentionGeometry, HeadRef
from llamafactory_hera.hera.projection import (
    AdapterColumns,
    base_and_adapters,
    base_weight_columns,
    combined,
    dora_row_norm,
    head_columns,
    project_heads,
)
from llamafactory_hera.runtime.errors import RecipeError


def is_zero3_partition(weight: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``weight`` (it adds a ``ds_id``)."""
    return hasattr(weight, "ds_id")


class _CopyWithGradient(torch.autograd.Function):
    """``weight[:, columns]`` (``columns`` None: all of ``weight``) as a float32 copy whose gradient goes back into
    a zero tensor of ``weight``'s shape and dtype at those columns. Nothing is saved for backward with
    ``save_for_backward``: the copy is taken in the first forward only (the hooks are disarmed in a checkpointed
    layer's recomputation), and a saved tensor there would make the two forwards save different tensors."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.columns = weight.shape, weight.dtype, columns
        return (weight if columns is None else weight[:, columns]).to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.columns is None:
            return grad.to(ctx.dtype), None
        full = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        full[:, ctx.columns] = grad.to(ctx.dtype)
        return full, None


class InCallColumns:
    """One ``o_proj``'s effective weight at the heads' ``columns`` ``[C]``, its pieces copied inside the calls of its
    modules while :attr:`armed` and while ZeRO-3 partitions its base weight (a ``ds_id``); :meth:`take` combines them
    (``projection.combined``: the same sum as ``projection.effective_weight_columns``), None when nothing was
    partitioned (the other engines read the weight after the forward)."""

    def __init__(self, o_proj: nn.Module, columns: torch.Tensor) -> None:
        self.o_proj, self.columns, self.armed = o_proj, columns, False
        self.pieces: dict[Any, torch.Tensor] = {}
        self.partitioned = False  # this forward's base weight is a ZeRO-3 partition: set in the base's call, the first
        self.base, _ = base_and_adapters(o_proj)
        self._hook(self.base, "weight", columns)
        for name in getattr(o_proj, "lora_A", {}):
            self._hook(o_proj.lora_A[name], ("lora_a", name), columns)
            self._hook(o_proj.lora_B[name], ("lora_b", name), None)
            if name in getattr(o_proj, "lora_magnitude_vector", {}):  # DoRA
                magnitude = o_proj.lora_magnitude_vector[name]
                self._hook(magnitude, ("magnitude", name), None)
                magnitude.get_weight_norm = self._norm_reader(magnitude.get_weight_norm, name)

    def _hook(self, module: nn.Module, key: Any, columns: torch.Tensor | None) -> None:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if module is self.base:
                self.partitioned = self.armed and is_zero3_partition(module.weight)
            if self.partitioned:
                weight, cols = module.weight, None if columns is None else self._columns_on(module.weight.device)
                self.pieces[key] = (
                    base_weight_columns(module, cols).detach()  # read as its forward does: a
                    if module is self.base and not weight.requires_grad  # copy, dequantized if 4-bit
                    else _CopyWithGradient.apply(weight, cols)
                )

        # first: before DeepSpeed's hook releases the gathered weight
        module.register_forward_hook(hook, prepend=True)

    def _columns_on(self, device: torch.device) -> torch.Tensor:
        """The columns on ``device``, copied there once (a copy from the host in every call would wait for it)."""
        if self.columns.device != device:
            self.columns = self.columns.to(device)
        return self.columns

    def _norm_reader(self, get_weight_norm: Any, name: str) -> Any:
        """PEFT's DoRA ``get_weight_norm(weight, lora_weight, scaling)``, which also keeps ``||W + s B A||_row`` in
        float32 (``projection.dora_row_norm``, as the other engines' path) from the weights PEFT's forward gathered
        for it."""

        def reading(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
            if self.partitioned:
                self.pieces[("norm", name)] = dora_row_norm(weight, lora_weight, scaling)
            return get_weight_norm(weight, lora_weight, scaling)

        return reading

    def take(self) -> torch.Tensor | None:
        """``[d, C]`` float32 effective weight columns from the pieces of the last armed forward, or None."""
        pieces, self.pieces, self.partitioned = self.pieces, {}, False
        if "weight" not in pieces:
            return None
        _, adapters = base_and_adapters(self.o_proj)
        needed = [
            (kind, name)
            for name in adapters
            for kind in ("lora_a", "lora_b", *(("magnitude", "norm") if self.o_proj.use_dora.get(name, False) else ()))
        ]
        if missing := [key for key in needed if key not in pieces]:
            raise RuntimeError(
                f"HeRA: o_proj's {missing} were not seen in its call under ZeRO-3; PEFT's LoRA layer "
                "did not call them in its forward."
            )
        return combined(
            pieces["weight"],
            [
                AdapterColumns(
                    pieces[("lora_a", name)],
                    pieces[("lora_b", name)],
                    self.o_proj.scaling[name],
                    (pieces[("magnitude", name)], pieces[("norm", name)])
                    if self.o_proj.use_dora.get(name, False)
                    else None,
                )
                for name in adapters
            ],
        )


class HeadCapture:
    """Forward hooks that produce ``[n_heads, B, d]`` head representations for one forward pass.

    A forward hook on each selected layer's ``o_proj`` copies the selected heads' slices of its input
    (``[B, T, n*d_head]``; slicing and concatenation save no tensors for backward, so gradient
    checkpointing's recomputation sees the same saved tensors with or without the hook). After the
    forward, the slices are pooled over the chosen tokens and projected through each head's ``W_O``
    columns, outside any checkpointed region, so the HeRA loss has a full autograd graph.
    Hooks act only while armed: recomputation during backward and evaluation forwards are ignored.
    """

    def __init__(self, model: nn.Module, heads: list[HeadRef], geometry: AttentionGeometry) -> None:
        self.heads = list(heads)
        self.geometry = geometry
        o_projs = head_projections(model)
        missing = sorted({ref.layer for ref in heads} - set(o_projs))
        if missing:
            raise ValueError(
                f"decoder layer(s) {missing} of the loaded model have no heads (layers with heads: "
                f"{sorted(o_projs)}); the config's plan said {list(geometry.head_layers)}"
            )
        self._by_layer: dict[int, list[int]] = defaultdict(list)
        for ref in self.heads:
            self._by_layer[ref.layer].append(ref.head)
        self._modules = {layer: o_projs[layer] for layer in self._by_layer}
        self._in_call = {
            layer: InCallColumns(self._modules[layer], head_columns(self._by_layer[layer], geometry.head_dim_of(layer)))
            for layer in self._by_layer
        }
        self._armed = False
        self._inputs: dict[int, torch.Tensor] = {}
        self.fed_by_trainable = trainable_upstream(model, sorted(self._by_layer))
        for layer in sorted(self._by_layer):
            self._modules[layer].register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: int):
        dh = self.geometry.head_dim_of(layer)
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
        for reader in self._in_call.values():
            reader.armed = True

    def drop(self) -> None:
        """Stop capturing and forget what the last forward left (it failed: nothing is built from it)."""
        self._armed, self._inputs = False, {}
        for reader in self._in_call.values():
            reader.armed, reader.pieces, reader.partitioned = False, {}, False

    def disarm(self, weights: torch.Tensor, check_gradient: bool = False) -> torch.Tensor | None:
        """Stop capturing; the ``[n_heads, B, d]`` float32 representations in recipe order (None if no hook fired)
        pooled with ``weights`` ``[B, T]`` (rows sum to 1, or 0 for samples without tokens). ``check_gradient``: in a
        training step, raise if a captured input that trainable parameters feed carries no gradient."""
        self._armed = False
        inputs, self._inputs = self._inputs, {}
        for reader in self._in_call.values():
            reader.armed = False
        in_call = {layer: reader.take() for layer, reader in self._in_call.items()}
        if not inputs:
            return None
        missing = sorted(set(self._by_layer) - set(inputs))
        if missing:
            raise RuntimeError(f"o_proj of layers {missing} did not run in this forward pass")
        # scanned on the checked steps only
        if check_gradient and (
            cut := [
                layer for layer, x in sorted(inputs.items()) if self.fed_by_trainable[layer] and not x.requires_grad
            ]
        ):
            raise RecipeError(
                f"HeRA: the o_proj input of layer(s) {cut} carries no gradient although trainable parameters feed "
                "it, so the HeRA gradient would reach only the selected heads' W_O columns. The forward ran without "
                "autograd: a gradient checkpointing that runs that layer under torch.no_grad (use_unsloth_gc, or a "
                "custom checkpointing function HeRA cannot make non-reentrant) is the usual cause. "
                "Remove use_unsloth_gc / set use_reentrant_gc: false."
            )
        reps: dict[HeadRef, torch.Tensor] = {}
        for layer, x_heads in inputs.items():
            if x_heads.shape[:2] != weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x_heads.shape)} but the pooling mask is "
                    f"{tuple(weights.shape)}; the model changes the sequence length internally."
                )
            pooled = torch.einsum("bt,btc->bc", weights.to(x_heads.device, torch.float32), x_heads.float())
            heads, module, head_dim = self._by_layer[layer], self._modules[layer], self.geometry.head_dim_of(layer)
            projected = project_heads(module, pooled, heads, head_dim, in_call[layer])  # [n, B, d]
            reps.update({HeadRef(layer, h): rep for h, rep in zip(heads, projected, strict=True)})
        return torch.stack([reps[ref] for ref in self.heads])
