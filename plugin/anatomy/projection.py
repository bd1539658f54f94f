"""Per-head contributions through ``o_proj`` (paper Eq. 6–7, App. A).

``o_proj`` is a linear map with weight ``[d, H * d_head]``; the input ``[.., H * d_head]`` is
head-major, so head h owns input columns ``h*d_head:(h+1)*d_head`` and its contribution to the
residual stream is ``x[.., h-slice] @ W[:, h-slice].T`` (bias excluded). With LoRA the effective
weight ``W + scaling * B @ A`` is used, restricted to the same columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder (the module with ``layers``) of a plain or PEFT-wrapped (M)LLM.

    Raises:
        ValueError: when the model exposes no decoder with ``layers``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if getattr(decoder, "layers", None) is None:
        raise ValueError(
            f"{type(base).__name__} has no text decoder with `layers` (looked at get_decoder().layers); "
            "HeRA needs decoder layers whose attention has an `o_proj` output projection."
        )
    return decoder


def find_o_proj_modules(model: nn.Module) -> list[nn.Module]:
    """``o_proj`` of every text-decoder layer, in layer order.

    Works on plain transformers MLLMs and on PEFT-wrapped ones (``get_base_model``); the
    returned modules are the LoRA layers themselves when LoRA targets ``o_proj``.

    Raises:
        ValueError: when the model has no ``layers[i].self_attn.o_proj`` in its text decoder.
    """
    modules = []
    for index, layer in enumerate(text_decoder(model).layers):
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if o_proj is None:
            raise ValueError(
                f"{type(model).__name__}: decoder layer {index} has no `self_attn.o_proj`; HeRA splits the attention "
                "output projection by head and cannot run on this architecture."
            )
        modules.append(o_proj)
    return modules


def effective_weight_columns(o_proj: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """Effective ``o_proj`` weight restricted to input ``columns``.

    Args:
        o_proj: ``nn.Linear`` or a PEFT LoRA ``Linear`` wrapping one.
        columns: ``[C]`` int64 input-column indices.

    Returns:
        ``[d, C]`` weight in the module's dtype, LoRA delta of every active, unmerged adapter included.
    """
    base = getattr(o_proj, "base_layer", None)
    if base is None:
        if not isinstance(o_proj, nn.Linear):
            raise TypeError(f"o_proj is a {type(o_proj).__name__}; HeRA supports nn.Linear and LoRA-wrapped Linear.")
        return o_proj.weight[:, columns]
    if not isinstance(base, nn.Linear) or getattr(base, "weight", None) is None or base.weight.ndim != 2:
        raise TypeError(
            f"o_proj wraps a {type(base).__name__}; HeRA needs a plain (unquantized) Linear base layer to read W_O."
        )
    weight = base.weight[:, columns]
    if getattr(o_proj, "merged", False) or getattr(o_proj, "disable_adapters", False):
        return weight
    for name in o_proj.active_adapters:
        if name not in o_proj.lora_A:
            continue
        if o_proj.use_dora.get(name, False):
            raise TypeError("o_proj uses DoRA; HeRA's per-head weight split supports plain LoRA only.")
        lora_a = o_proj.lora_A[name].weight[:, columns]  # [r, C]
        lora_b = o_proj.lora_B[name].weight  # [d, r]
        weight = weight + o_proj.scaling[name] * (lora_b @ lora_a).to(weight.dtype)
    return weight


def head_columns(heads: list[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``[len(heads) * head_dim]`` input-column indices of ``heads`` (head-major)."""
    offsets = torch.arange(head_dim, device=device)
    return torch.cat([h * head_dim + offsets for h in heads])


def project_heads(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """Project already-sliced head inputs through their ``W_O`` columns.

    Args:
        o_proj: the layer's output projection (plain or LoRA).
        x_heads: ``[..., len(heads) * head_dim]`` the slices of the ``o_proj`` input for ``heads``, in that order.
        heads: query-head indices.
        head_dim: width of one head.

    Returns:
        ``[len(heads), ..., d]`` float32 contributions to the residual stream.
    """
    columns = head_columns(heads, head_dim, x_heads.device)
    w_sel = effective_weight_columns(o_proj, columns).float().unflatten(-1, (len(heads), head_dim))  # [d, n, dh]
    x_sel = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [..., n, dh]
    return torch.einsum("...nk,dnk->n...d", x_sel, w_sel)


def head_contributions(o_proj: nn.Module, x: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """Each head's contribution to the residual stream.

    Args:
        o_proj: the layer's output projection (plain or LoRA).
        x: ``[..., H * head_dim]`` input of ``o_proj``.
        heads: query-head indices to project.
        head_dim: width of one head.

    Returns:
        ``[len(heads), ..., d]`` contributions in float32; summed over all heads they equal
        ``o_proj(x) - bias`` (LoRA dropout aside).
    """
    return project_heads(o_proj, x[..., head_columns(heads, head_dim, x.device)], heads, head_dim)


def is_partitioned(o_proj: nn.Module) -> bool:
    """True when ``o_proj``'s weight is a DeepSpeed ZeRO-3 partition (only gathered inside the module's forward)."""
    base = getattr(o_proj, "base_layer", o_proj)
    return hasattr(getattr(base, "weight", None), "ds_id")


def project_heads_by_call(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int,
                          width: int) -> torch.Tensor:
    """Like :func:`project_heads`, but through calls of ``o_proj`` itself (for ZeRO-3 partitioned weights).

    Each head's slice is placed alone in an otherwise zero ``[.., width]`` input and sent through the
    module, whose own hooks gather (and, in backward, re-gather) the partitioned weights; ``o_proj(0)``
    (the bias, and 0 from a LoRA delta) is subtracted. LoRA dropout is switched off for these calls, so they
    give exactly :func:`project_heads`'s effective-weight projection (the DDP path), whatever ``lora_dropout`` is.

    Args:
        o_proj: the layer's output projection.
        x_heads: ``[B, len(heads) * head_dim]`` pooled head inputs.
        heads: query-head indices, in the order of ``x_heads``.
        head_dim: width of one head.
        width: ``num_heads * head_dim``, the input width of ``o_proj``.

    Returns:
        ``[len(heads), B, d]`` float32 contributions.
    """
    base = getattr(o_proj, "base_layer", o_proj)
    dtype = base.weight.dtype
    batch = x_heads.shape[0]
    rows = []
    for j, head in enumerate(heads):
        piece = x_heads[:, j * head_dim:(j + 1) * head_dim]
        left = piece.new_zeros(batch, head * head_dim)
        right = piece.new_zeros(batch, width - (head + 1) * head_dim)
        rows.append(torch.cat([left, piece, right], dim=-1))
    inputs = torch.cat(rows).to(dtype)  # [n*B, width]
    with _lora_dropout_off(o_proj):
        out = o_proj(inputs) - o_proj(inputs.new_zeros(1, width))
    return out.float().unflatten(0, (len(heads), batch))


@contextlib.contextmanager
def _lora_dropout_off(o_proj: nn.Module) -> Iterator[None]:
    """Put a LoRA layer's dropout modules in eval mode (identity) for the duration; restore their mode after."""
    dropouts = list(getattr(o_proj, "lora_dropout", {}).values()) if hasattr(o_proj, "lora_dropout") else []
    modes = [module.training for module in dropouts]
    for module in dropouts:
        module.train(False)
    try:
        yield
    finally:
        for module, mode in zip(dropouts, modes, strict=True):
            module.train(mode)
