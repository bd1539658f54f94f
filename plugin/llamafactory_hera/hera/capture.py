"""Capture of the heads' inputs in the LM forward (:class:`HeadCapture`, steps 2-3 of the HeRA step).

A ZeRO-3 parameter is whole only inside its module's call, so hooks copy the heads' ``o_proj`` columns there
(:class:`InCallColumns`; docs/hera-design.md, "ZeRO-3").
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from llamafactory_hera.heads.architecture import head_projections, trainable_upstream
from llamafactory_hera.heads.geometry import AttentionGeometry, HeadRef
from llamafactory_hera.hera.projection import (
    AdapterColumns,
    base_and_adapters,
    base_weight_columns,
    combined,
    dora_row_norm,
    effective_weight_columns,
    head_columns,
)
from llamafactory_hera.runtime.errors import RecipeError


def is_zero3_partition(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")


class _CopyWithGradient(torch.autograd.Function):
    """``weight[:, columns]`` (None: all) as a float32 copy, its gradient scattered back. Nothing is saved for
    backward: hooks are disarmed in a checkpoint's recomputation, so a saved tensor would differ between forwards."""

    @staticmethod
    @override
    def forward(ctx: Any, weight: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        ctx.shape = weight.shape
        ctx.dtype = weight.dtype
        ctx.columns = columns
        return (weight if columns is None else weight[:, columns]).to(torch.float32, copy=True)

    @staticmethod
    @override
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.columns is None:
            return grad.to(ctx.dtype), None
        full = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        full[:, ctx.columns] = grad.to(ctx.dtype)
        return full, None


class InCallColumns:
    """One ``o_proj``'s effective weight at ``columns`` ``[C]``, copied in its modules' calls while :attr:`armed` under
    ZeRO-3; :meth:`take` sums the pieces as ``projection.effective_weight_columns`` does."""

    def __init__(self, o_proj: nn.Module, columns: torch.Tensor) -> None:
        self.o_proj = o_proj
        self.columns = columns
        self.armed = False
        self.pieces: dict[Any, torch.Tensor] = {}
        self.partitioned = False  # base weight is a ZeRO-3 partition this forward: set in the base's (first) call
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
                weight = module.weight
                cols = None if columns is None else self.columns_on(module.weight.device)
                self.pieces[key] = (
                    base_weight_columns(module, cols).detach()  # as its forward reads it: a copy,
                    if module is self.base and not weight.requires_grad  # dequantized if 4-bit
                    else _CopyWithGradient.apply(weight, cols)
                )

        # first: before DeepSpeed's hook releases the gathered weight
        module.register_forward_hook(hook, prepend=True)

    def columns_on(self, device: torch.device) -> torch.Tensor:
        """The columns on ``device``, moved once (a host copy per call would wait)."""
        if self.columns.device != device:
            self.columns = self.columns.to(device)
        return self.columns

    def _norm_reader(self, get_weight_norm: Any, name: str) -> Any:
        """PEFT's DoRA ``get_weight_norm``, also keeping the float32 row norm (``projection.dora_row_norm``)."""

        def reading(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
            if self.partitioned:
                self.pieces[("norm", name)] = dora_row_norm(weight, lora_weight, scaling)
            return get_weight_norm(weight, lora_weight, scaling)

        return reading

    def take(self) -> torch.Tensor | None:
        """``[d, C]`` float32 effective weight columns from the last armed forward, or None."""
        pieces = self.pieces
        self.pieces = {}
        self.partitioned = False
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


class _LayerRun:
    """A layer's checkpointed call returning ``(*outputs, inputs[, columns])``; plain ``W_O`` columns are read inside
    so their gradient comes in the layer's own backward (DDP refuses a second one)."""

    def __init__(self, capture: HeadCapture, layer: int, func: Callable[..., Any]) -> None:
        self.capture = capture
        self.layer = layer
        self.func = func
        self.__self__ = func.func.__self__ if isinstance(func, functools.partial) else getattr(func, "__self__", None)
        self.single = True  # the layer returns one tensor, not a tuple: set by each call
        # decided once: the first forward and its recomputation must return the same outputs
        self.with_columns = not any(hasattr(p, "full_tensor") for p in capture._modules[layer].parameters())

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        slot: list[torch.Tensor] = []
        self.capture._slots[self.layer] = slot
        try:
            out = self.func(*args)
        finally:
            del self.capture._slots[self.layer]
        if len(slot) != 1:
            raise RuntimeError(f"o_proj of layer {self.layer} ran {len(slot)} times in one call of its layer")
        self.single = not isinstance(out, tuple)
        extra = (slot[0],)
        if self.with_columns:  # float32, as outside the forward (its autocast would round to bf16)
            device = slot[0].device
            exact = torch.amp.is_autocast_available(device.type)
            with torch.autocast(device.type, enabled=False) if exact else contextlib.nullcontext():
                extra = (slot[0], self.capture._weight_columns(self.layer, None, device))
        return (out, *extra) if self.single else (*out, *extra)


class HeadCapture:
    """Forward hooks producing ``[n_heads, B, d]`` head representations for one forward pass, while armed.

    Each selected ``o_proj``'s hook copies the heads' slices of its input ``[B, T, n*d_head]``; after the forward
    they are pooled and projected through each head's ``W_O`` columns. Reentrant checkpointing runs the first forward
    without autograd, so such a layer's slices and columns leave its checkpoint as extra outputs (:meth:`checkpointed`).
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
        # computed per head size (one pooling and projection each), then put back in recipe order (None: already)
        by_size: dict[int, list[int]] = defaultdict(list)
        for layer in sorted(self._by_layer):
            by_size[geometry.head_dim_of(layer)].append(layer)
        self._groups = sorted(by_size.items())
        computed = [
            HeadRef(layer, head) for _, layers in self._groups for layer in layers for head in self._by_layer[layer]
        ]
        order = [computed.index(ref) for ref in self.heads]
        self._order = None if order == list(range(len(order))) else torch.tensor(order)
        self._armed = False
        self._inputs: dict[int, torch.Tensor] = {}
        self._slots: dict[int, list[torch.Tensor]] = {}  # layer -> its heads' inputs, inside a checkpointed() call
        self._read_columns: dict[int, torch.Tensor] = {}  # layer -> its heads' W_O columns read in its checkpoint
        self.fed_by_trainable = trainable_upstream(model, sorted(self._by_layer))
        for layer in sorted(self._by_layer):
            self._modules[layer].register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: int):
        dh = self.geometry.head_dim_of(layer)
        runs: list[list[int]] = []  # [first column, width] of each run of consecutive heads, in recipe order
        for head in self._by_layer[layer]:
            if runs and runs[-1][0] + runs[-1][1] == head * dh:
                runs[-1][1] += dh
            else:
                runs.append([head * dh, dh])

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            slot = self._slots.get(layer)  # inside checkpointed(): the first forward and its recomputation
            if slot is not None or self._armed:
                x = args[0]  # [B, T, H*dh]
                parts = [x.narrow(-1, start, width) for start, width in runs]
                heads = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].clone()  # [B, T, n*dh], a copy
                if slot is not None:
                    slot.append(heads)
                else:
                    self._inputs[layer] = heads

        return hook

    @property
    def copies_in_call(self) -> bool:
        """Whether a head's ``o_proj`` weight is a ZeRO-3 partition: its layer must not checkpoint reentrantly."""
        return any(is_zero3_partition(reader.base.weight) for reader in self._in_call.values())

    def checkpointed(self, layer: int, function: Callable[..., Any]) -> Callable[..., Any]:
        """Layer ``layer``'s reentrant checkpointing ``function``, also handing out the heads' inputs while armed."""

        @functools.wraps(function)
        def capturing(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not self._armed:
                return function(func, *args, **kwargs)
            run = _LayerRun(self, layer, func)
            outputs = function(run, *args, **kwargs)
            if run.with_columns:
                *outputs, self._inputs[layer], self._read_columns[layer] = outputs
            else:
                *outputs, self._inputs[layer] = outputs
            return outputs[0] if run.single else tuple(outputs)

        return capturing

    def arm(self) -> None:
        self._armed = True
        self._inputs = {}
        self._read_columns = {}
        for reader in self._in_call.values():
            reader.armed = True

    def drop(self) -> None:
        """Stop capturing and forget the last (failed) forward's captures."""
        self._armed = False
        self._inputs = {}
        self._read_columns = {}
        for reader in self._in_call.values():
            reader.armed = False
            reader.pieces = {}
            reader.partitioned = False

    def disarm(self, weights: torch.Tensor, check_gradient: bool = False) -> torch.Tensor | None:
        """Stop capturing; return ``[n_heads, B, d]`` float32 representations in recipe order (None if no hook fired),
        pooled with ``weights`` ``[B, T]`` (rows sum to 1, or 0 without tokens). ``check_gradient``: raise if an
        input fed by trainable parameters carries no gradient."""
        self._armed = False
        inputs = self._inputs
        self._inputs = {}
        for reader in self._in_call.values():
            reader.armed = False
        # W_O columns read already: in the layer's checkpoint, or in the modules' calls (ZeRO-3)
        in_call = {layer: reader.take() for layer, reader in self._in_call.items()}
        in_call.update(self._read_columns)
        self._read_columns = {}
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
        for layer, x_heads in inputs.items():
            if x_heads.shape[:2] != weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x_heads.shape)} but the pooling mask is "
                    f"{tuple(weights.shape)}; the model changes the sequence length internally."
                )
        # per head size, all layers at once: pooling [B, 1, T] x [B, T, N*dh], projection [N, B, dh] x [N, dh, d]
        device = next(iter(inputs.values())).device
        pooling = weights.to(device, torch.float32).unsqueeze(1)
        parts = []
        for head_dim, layers in self._groups:
            x_heads = _joined([inputs[layer] for layer in layers], 2).float()  # [B, T, N*dh]
            pooled = torch.bmm(pooling, x_heads)  # [B, 1, N*dh]
            columns = _joined([self._weight_columns(layer, in_call[layer], device) for layer in layers], 1)  # [d, N*dh]
            heads = columns.shape[1] // head_dim
            pooled = pooled.view(pooled.shape[0], heads, head_dim).transpose(0, 1)  # [N, B, dh]
            parts.append(torch.bmm(pooled, columns.reshape(columns.shape[0], heads, head_dim).permute(1, 2, 0)))
        reps = _joined(parts, 0)  # [n_heads, B, d]
        if self._order is not None:
            self._order = self._order.to(device)
            reps = reps.index_select(0, self._order)
        return reps

    def _weight_columns(self, layer: int, in_call: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """``[d, n*dh]`` float32 ``W_O`` columns of ``layer``'s heads: ``in_call``, else read now."""
        if in_call is not None:
            return in_call
        return effective_weight_columns(self._modules[layer], self._in_call[layer].columns_on(device))


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
