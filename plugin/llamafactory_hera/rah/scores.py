"""RAH-LoRA's head scores: I-SAL (Eq. 3-4), its per-layer standardisation, and CAF (Eq. 5).

Shapes: ``attn [B, H, T, T]`` (one layer's softmax attention, query x key), masks ``[B, T]`` bool, ``grads [N, L, H]``
(d loss / d gate per sample, layer and head).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def _half(
    attn: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, visible_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention summed over (query, key) pairs ``[B, H]``, pair count ``[B]``); ``visible_only``: only pairs whose
    key is not after the query."""
    length = attn.shape[-1]
    pairs = queries[:, :, None] & keys[:, None, :]  # [B, T, T]
    if visible_only:
        pairs = pairs & torch.ones(length, length, dtype=torch.bool, device=attn.device).tril()
    total = (attn.float() * pairs[:, None]).sum(dim=(-1, -2))
    return total, pairs.sum(dim=(-1, -2))


def isal(
    attn: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor, pairs: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-SAL (Eq. 3): half the mean text->image attention plus half the mean image->text; returns (``[B, H]`` float32,
    ``[B]`` bool: both halves present). ``paper``: text->image over all pairs as Eq. 3 writes it; ``visible``: both
    over visible pairs. A half with no pair is left out."""
    if pairs not in ("paper", "visible"):
        raise ValueError(f"rah_isal_pairs: got {pairs!r}; allowed values are paper, visible.")
    t2i, t2i_pairs = _half(attn, text_mask, image_mask, visible_only=pairs == "visible")
    i2t, i2t_pairs = _half(attn, image_mask, text_mask, visible_only=True)
    has_t2i = (t2i_pairs > 0)[:, None]
    has_i2t = (i2t_pairs > 0)[:, None]
    mean_t2i = t2i / t2i_pairs.clamp(min=1)[:, None]
    mean_i2t = i2t / i2t_pairs.clamp(min=1)[:, None]
    both = has_t2i & has_i2t
    score = torch.where(both, 0.5 * (mean_t2i + mean_i2t), torch.where(has_t2i, mean_t2i, mean_i2t))
    if not bool((has_t2i | has_i2t).all()):
        raise ValueError(
            "I-SAL: a sample has no visible pair of text and image tokens (no image token, or no text "
            "around it); such samples cannot be scored."
        )
    return score, both[:, 0]


def standardize_per_layer(scores: torch.Tensor) -> torch.Tensor:
    """``[L, H]`` -> ``(r - mean_l) / (std_l + eps)`` per layer (Eq. 4; population std over the heads)."""
    return (scores - scores.mean(dim=-1, keepdim=True)) / (scores.std(dim=-1, unbiased=False, keepdim=True) + EPS)


def margin_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Label-free margin loss (Eq. 5): ``-mean_t log(p_t1 / p_t2)`` over the two likeliest tokens at ``positions``
    ``[B, T]`` (text after the image) of ``logits`` ``[B, T, V]``; ``log(p1/p2)`` is the gap of the two largest
    logits, so no softmax is formed."""
    top = logits.to(torch.promote_types(logits.dtype, torch.float32)).topk(2, dim=-1).values  # [B, T, 2], >= fp32
    gap = top[..., 0] - top[..., 1]
    weights = positions.to(top.dtype)
    if float(weights.sum()) == 0:
        raise ValueError("CAF: no text position after the image to score (the probe samples end at their image).")
    return -(gap * weights).sum() / weights.sum()


def caf_scores(grads: torch.Tensor, form: str = "magnitude", weight: float = 0.25) -> torch.Tensor:
    """``[L, H]`` float32 CAF from gate gradients ``[N, L, H]``: ``magnitude`` ``z(|mean g|) + weight * z(mean g^2)``,
    z standardised per layer (a head's influence whatever its sign); ``paper``: Eq. 5 as printed,
    ``mean g + weight * mean g^2``."""
    grads = grads.float()
    mean = grads.mean(dim=0)
    mean_square = grads.pow(2).mean(dim=0)
    if form == "paper":
        return mean + weight * mean_square
    if form != "magnitude":
        raise ValueError(f"rah_caf_form: got {form!r}; allowed values are magnitude, paper.")
    return standardize_per_layer(mean.abs()) + weight * standardize_per_layer(mean_square)
