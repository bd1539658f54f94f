"""Per-head contributions through ``o_proj`` (paper Eq. 6–7, App. A).

``o_proj`` is a linear map with weight ``[d, H * d_head]``; the input ``[.., H * d_head]`` is
head-major, so head h owns input columns ``h*d_head:(h+1)*d_head`` and its contribution to the
residual stream is ``x[.., h-slice] @ W[:, h-slice].T`` (bias excluded). With LoRA the effective
weight ``W + scaling * B @ A`` is used, restricted to the same columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def effective_weight_columns(o_proj: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """``[d, C]`` effective weight of ``o_proj`` (``nn.Linear`` or a PEFT LoRA ``Linear`` wrapping one) at the
    ``[C]`` input ``columns``: the LoRA delta of every active, unmerged adapter included, summed in float32.

    The base weight and each LoRA delta are cast to float32 before they are added: in bf16 a LoRA delta a
    few 1e-5 of the weight (early in training) is mostly rounded away by the sum (at |delta|/|W| = 7e-5, 98.6 %
    of its effect on the projected value).
    """
    base, adapters = _base_and_adapters(o_proj)
    if base.weight.ndim != 2:  # a ZeRO-3 partition outside its gather: an empty 1-D placeholder
        raise RuntimeError("o_proj's weight is a DeepSpeed ZeRO-3 partition; read it inside "
                           "deepspeed.zero.GatheredParameters, or project through project_heads_by_call.")
    weight = base.weight[:, columns].float()
    for name in adapters:
        lora_a = o_proj.lora_A[name].weight[:, columns].float()  # [r, C]
        lora_b = o_proj.lora_B[name].weight.float()  # [d, r]
        weight = weight + o_proj.scaling[name] * (lora_b @ lora_a)
    return weight


def _base_and_adapters(o_proj: nn.Module) -> tuple[nn.Linear, list[str]]:
    """(the plain Linear holding ``W_O``, the names of the LoRA adapters whose delta adds to it: none for a plain
    ``o_proj``, or when merged or disabled)."""
    base = getattr(o_proj, "base_layer", None)
    if base is None:
        if not isinstance(o_proj, nn.Linear):
            raise TypeError(f"o_proj is a {type(o_proj).__name__}; llamafactory-hera supports nn.Linear and "
                            "LoRA-wrapped Linear.")
        return o_proj, []
    if not isinstance(base, nn.Linear) or len(_full_shape(getattr(base, "weight", None))) != 2:
        raise TypeError(
            f"o_proj wraps a {type(base).__name__}; llamafactory-hera needs a plain (unquantized) Linear base layer to "
            "read W_O."
        )
    if getattr(o_proj, "merged", False) or getattr(o_proj, "disable_adapters", False):
        return base, []
    names = [name for name in o_proj.active_adapters if name in o_proj.lora_A]
    if any(o_proj.use_dora.get(name, False) for name in names):
        raise TypeError("o_proj uses DoRA; HeRA's per-head weight split supports plain LoRA only.")
    return base, names


def _full_shape(weight: torch.Tensor | None) -> tuple[int, ...]:
    """The shape of ``weight`` as the model defines it: a DeepSpeed ZeRO-3 partition (a ``ds_id``) keeps it in
    ``ds_shape`` (outside a gather its data is an empty 1-D placeholder); () for no weight."""
    if weight is None:
        return ()
    return tuple(weight.ds_shape) if hasattr(weight, "ds_id") else tuple(weight.shape)


def head_columns(heads: list[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``[len(heads) * head_dim]`` input-column indices of ``heads`` (head-major)."""
    offsets = torch.arange(head_dim, device=device)
    return torch.cat([h * head_dim + offsets for h in heads])


def project_heads(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """``[len(heads), ..., d]``: each head's contribution to the residual stream, its slice of ``x_heads``
    ``[..., len(heads) * head_dim]`` (the ``o_proj`` input's slices for ``heads``, in that order) through its ``W_O``
    columns, in float32 (inputs and weight cast). Over every head they sum to ``o_proj(x) - bias`` (LoRA dropout
    aside)."""
    columns = head_columns(heads, head_dim, x_heads.device)
    w_sel = effective_weight_columns(o_proj, columns).unflatten(-1, (len(heads), head_dim))  # [d, n, dh] float32
    x_sel = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [..., n, dh]
    return torch.einsum("...nk,dnk->n...d", x_sel, w_sel)


def is_partitioned(o_proj: nn.Module) -> bool:
    """True when ``o_proj``'s weight is a DeepSpeed ZeRO-3 partition (only gathered inside the module's forward)."""
    base = getattr(o_proj, "base_layer", o_proj)
    return hasattr(getattr(base, "weight", None), "ds_id")


def project_heads_by_call(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int,
                          width: int) -> torch.Tensor:
    """Like :func:`project_heads`, but inside calls of ``o_proj``'s modules (for ZeRO-3 partitioned weights).

    A ZeRO-3 weight is whole only inside its module's call (the module's hooks gather it, and gather it again
    for backward). So the base layer, and each active LoRA adapter's ``lora_A`` and ``lora_B``, is called with
    its ``forward`` swapped for the float32 product of the head columns of its own weight. The result is
    :func:`project_heads`'s ``x @ (W + s B A)^T`` computed as ``x W^T + s (x A^T) B^T``, all in float32: the two
    paths differ by float32 rounding only. LoRA dropout is not applied (as in the effective-weight path).
    ``x_heads``: ``[B, len(heads) * head_dim]`` pooled head inputs; ``width``: ``num_heads * head_dim``, the input
    width of ``o_proj`` (checked against the weight). Returns ``[len(heads), B, d]`` float32 contributions.
    """
    base, adapters = _base_and_adapters(o_proj)
    if base.in_features != width:
        raise ValueError(f"o_proj takes {base.in_features} inputs, expected num_heads * head_dim = {width}")
    columns = head_columns(heads, head_dim, x_heads.device)
    x = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [B, n, dh]

    def through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [B, n, dh] -> [n, B, rows of weight]
        weight = module.weight[:, columns].float().unflatten(-1, (len(heads), head_dim))  # [out, n, dh]
        return torch.einsum("bnk,onk->nbo", x, weight)

    out = _call_as(base, through, x)
    for name in adapters:
        lora_b = o_proj.lora_B[name]
        low = _call_as(o_proj.lora_A[name], through, x)  # [n, B, r]
        out = out + o_proj.scaling[name] * _call_as(lora_b, lambda m, z: z @ m.weight.float().T, low)
    return out


def _call_as(module: nn.Module, compute: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
    """``compute(module, x)`` run as ``module``'s forward, through ``module(x)``: its hooks (ZeRO-3's gathering of
    its parameters, in forward and backward) act as in an ordinary call."""
    own = module.__dict__.get("forward")
    module.forward = lambda inputs: compute(module, inputs)
    try:
        return module(x)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
