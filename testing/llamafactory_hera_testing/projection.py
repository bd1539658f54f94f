"""Each head's projection taken alone: the reference the tests hold HeRA's batched capture (hera/capture.py) to."""

from __future__ import annotations

import torch
from torch import nn

from llamafactory_hera.hera.projection import effective_weight_columns, head_columns


def project_heads(
    o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``[len(heads), ..., d]`` float32: each head's slice of ``x_heads`` ``[..., len(heads) * head_dim]`` through its
    ``W_O`` columns ``weight`` ``[d, len(heads) * head_dim]`` (None: read here). Over all heads they sum to
    ``o_proj(x) - bias`` (LoRA dropout aside)."""
    if weight is None:
        weight = effective_weight_columns(o_proj, head_columns(heads, head_dim, x_heads.device))
    w_sel = weight.unflatten(-1, (len(heads), head_dim))  # [d, n, dh] float32
    x_sel = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [..., n, dh]
    return torch.einsum("...nk,dnk->n...d", x_sel, w_sel)
