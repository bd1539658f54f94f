"""MKNN score of every attention head against the teacher.

A head's representation is ``M_h = P_h @ W_h.T`` (``P_h`` ``[N, d_head]`` pooled inputs, ``W_h`` ``[d, d_head]`` its
``o_proj`` columns), so its Gram matrix ``P_h (W_h^T W_h) P_h^T`` needs only a ``d_head x d_head`` block. With PRH's
outlier clamp ``M_h`` ``[N, d]`` is formed per chunk of heads (docs/hera-design.md, "Head selection").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from llamafactory_hera.hera.metrics import knn_indices, knn_overlap, top_k_stable


def ranked_similarity(gram: torch.Tensor) -> torch.Tensor:
    """``[..., N, N]`` cosine ranking from Gram matrices ``[..., N, N]``: row i ranks j by ``<m_i, m_j> / |m_j|``
    (the row factor ``1/|m_i|`` changes no ranking); the diagonal (self) is ``-inf``."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()  # [..., N]
    ranked = gram / norms.unsqueeze(-2)
    ranked.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    return ranked


def row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``[...]`` q-quantile of each row of ``values`` ``[..., D]``, interpolated linearly as ``torch.quantile``.

    The two order statistics around ``q * (D - 1)`` come from one ``topk``, cheaper than a sort; ``torch.quantile``
    refuses over 2**24 elements.
    """
    width = values.shape[-1]
    position = q * (width - 1)
    low = int(position)
    largest = values.topk(width - low, dim=-1, sorted=True).values  # descending; last = (low+1)-th smallest
    lower = largest[..., -1]
    if low + 1 >= width:
        return lower
    upper = largest[..., -2]
    return lower + (upper - lower) * (position - low)


def clamp_outliers(feats: torch.Tensor, q: float) -> torch.Tensor:
    """PRH's outlier clamp of ``feats`` ``[..., N, D]`` to ``[-t, t]``, ``t`` = mean over the N samples of each
    sample's q-quantile of ``|value|`` (one t per leading index); ``q`` 0 or 1: unchanged."""
    if q <= 0 or q >= 1:
        return feats
    threshold = row_quantile(feats.abs(), q).mean(-1, keepdim=True).unsqueeze(-1)  # [..., 1, 1]
    return torch.maximum(torch.minimum(feats, threshold), -threshold)


def layer_head_neighbours(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    teacher_knn: torch.Tensor,
    k: int,
    head_dim: int,
    max_chunk_elements: int = 2**26,
    clamp: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (``[H]`` float32 MKNN in [0, 1], ``[H, N]`` float32 ``|kNN_head(i) ∩ kNN_teacher(i)| / k`` it
    averages) from ``pooled`` ``[N, H * head_dim]`` ``o_proj`` inputs, effective ``weight`` ``[d, H * head_dim]`` and
    ``teacher_knn`` ``[N, k]``; ``max_chunk_elements`` bounds a ``[h, N, N]`` block (clamp: ``[h, N, d]``)."""
    num = pooled.shape[0]
    if not 1 <= k <= num - 1:
        raise ValueError(f"k={k} needs 1 <= k <= N-1 with N={num} samples; use fewer neighbours or more samples.")
    heads = pooled.shape[1] // head_dim
    p = pooled.float().unflatten(-1, (heads, head_dim)).transpose(0, 1)  # [H, N, dh]
    w = weight.float().to(p.device).unflatten(-1, (heads, head_dim))  # [d, H, dh]
    overlaps = torch.cat(
        [
            knn_overlap(top_k_stable(ranked, k), teacher_knn.to(ranked.device).unsqueeze(0), num)
            for ranked in _ranked_blocks(p, w, max_chunk_elements, clamp)
        ]
    )  # [H, N]
    return overlaps.mean(-1), overlaps


def _ranked_blocks(p: torch.Tensor, w: torch.Tensor, max_chunk_elements: int, clamp: float) -> Iterator[torch.Tensor]:
    """Each chunk of heads' ranking ``[h, N, N]`` from ``p`` ``[H, N, dh]`` and ``w`` ``[d, H, dh]``: Gram form, or
    with the clamp (``0 < clamp < 1``) explicit ``M_h = P_h W_h^T`` ``[h, N, d]``."""
    heads = p.shape[0]
    num = p.shape[1]
    if 0 < clamp < 1:
        chunk = max(1, max_chunk_elements // (num * max(num, w.shape[0])))
        for start in range(0, heads, chunk):
            reps = torch.einsum("hnk,dhk->hnd", p[start : start + chunk], w[:, start : start + chunk])  # [h, N, d]
            unit = torch.nn.functional.normalize(clamp_outliers(reps, clamp), dim=-1)
            yield ranked_similarity(unit @ unit.transpose(-1, -2))
        return
    covariance = torch.einsum("dhk,dhj->hkj", w, w)  # [H, dh, dh] = W_h^T W_h
    chunk = max(1, max_chunk_elements // (num * num))
    for start in range(0, heads, chunk):
        p_c = p[start : start + chunk]
        yield ranked_similarity(p_c @ covariance[start : start + chunk] @ p_c.transpose(-1, -2))


def teacher_neighbours(teacher: torch.Tensor, k: int, device: torch.device | str, clamp: float = 0.0) -> torch.Tensor:
    """``[N, k]`` neighbours among teacher features ``[N, E]`` (clamped as the heads), on ``device``: MKNN's side
    every head is compared with."""
    return knn_indices(clamp_outliers(teacher.to(device).float(), clamp), k)


@dataclass
class HeadNeighbours:
    """Every head's MKNN and the per-pair overlaps it averages (CPU; the report's bootstrap resamples them)."""

    scores: torch.Tensor  # [L, H] float32
    overlaps: torch.Tensor  # [L, H, N] float32 |kNN_head(i) ∩ kNN_teacher(i)| / k


def all_head_neighbours(
    pooled: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    weights: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    teacher: torch.Tensor,
    k: int,
    head_dim: int | Mapping[int, int],
    device: torch.device | str | None = None,
    clamp: float = 0.0,
    num_layers: int | None = None,
) -> HeadNeighbours:
    """:func:`layer_head_neighbours` of every layer with heads, NaN rows for the others. ``pooled`` / ``weights``:
    layer -> inputs / weight (a sequence: from layer 0); ``head_dim``: one width or layer -> width (Gemma 4);
    ``num_layers``: default one past the last layer with heads."""
    device = device or teacher.device
    pooled = pooled if isinstance(pooled, Mapping) else dict(enumerate(pooled))
    weights = weights if isinstance(weights, Mapping) else dict(enumerate(weights))
    teacher_knn = teacher_neighbours(teacher, k, device, clamp)
    dims = head_dim if isinstance(head_dim, Mapping) else dict.fromkeys(pooled, head_dim)
    rows = {
        layer: layer_head_neighbours(p.to(device), weights[layer].to(device), teacher_knn, k, dims[layer], clamp=clamp)
        for layer, p in pooled.items()
    }
    # one device-to-host copy for every layer
    scores = torch.stack([r[0] for r in rows.values()]).cpu()
    overlaps = torch.stack([r[1] for r in rows.values()]).cpu()
    depth = max(rows) + 1 if num_layers is None else num_layers
    if list(rows) == list(range(depth)):
        return HeadNeighbours(scores, overlaps)
    index = torch.tensor(list(rows))
    full_scores = torch.full((depth, *scores.shape[1:]), float("nan"))
    full_overlaps = torch.full((depth, *overlaps.shape[1:]), float("nan"))
    full_scores[index] = scores
    full_overlaps[index] = overlaps
    return HeadNeighbours(full_scores, full_overlaps)
