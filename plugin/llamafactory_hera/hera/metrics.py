"""Alignment metrics between two representation spaces.

``mutual_knn`` follows the Platonic Representation Hypothesis code (``minyoungg/platonic-rep``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_indices(feats: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., N, k]`` int64 cosine nearest neighbours (float32, self excluded, nearest first) of each row of
    ``feats`` ``[..., N, D]``; ``1 <= k <= N - 1``."""
    num = feats.shape[-2]
    if not 1 <= k <= num - 1:
        raise ValueError(f"k={k} needs 1 <= k <= N-1 with N={num} samples; use fewer neighbours or more samples.")
    unit = F.normalize(feats.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    self_mask = torch.eye(num, dtype=torch.bool, device=gram.device)
    gram = gram.masked_fill(self_mask, float("-inf"))
    return top_k_stable(gram, k)


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., k]`` indices of each row's k largest values; a tie at the k-th place goes to the lower index.

    ``torch.topk`` leaves ties unspecified; tied rows are redone with a stable sort.
    """
    values, indices = scores.topk(k, dim=-1)
    kth = values[..., -1:]
    tied = (scores == kth).sum(-1) > (values == kth).sum(-1)
    if bool(tied.any()):
        stable = torch.sort(scores[tied], dim=-1, descending=True, stable=True).indices[..., :k]
        indices = indices.clone()
        indices[tied] = stable
    return indices


def knn_overlap(knn_a: torch.Tensor, knn_b: torch.Tensor, num: int) -> torch.Tensor:
    """``[..., N]`` float32 overlap ``|A_i ∩ B_i| / k`` of two ``[..., N, k]`` neighbour sets over ``num`` indices
    (``knn_a`` distinct per row, broadcastable against ``knn_b``). Only B becomes an ``[..., N, N]`` mask, so one
    teacher against many heads costs ``O(N^2)`` once plus ``O(N k)`` per head."""
    k = knn_a.shape[-1]
    member_b = torch.zeros((*knn_b.shape[:-1], num), dtype=torch.float32, device=knn_b.device).scatter_(-1, knn_b, 1.0)
    batch = torch.broadcast_shapes(knn_a.shape[:-2], knn_b.shape[:-2])
    member_b = member_b.expand(*batch, *member_b.shape[-2:])
    return member_b.gather(-1, knn_a.expand(*batch, *knn_a.shape[-2:])).sum(-1) / k


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int = 10) -> float:
    """Mutual kNN alignment of ``[N, D_a]`` and ``[N, D_b]`` features of the same samples (PRH's default k: 10):
    mean of ``|kNN_a(i) ∩ kNN_b(i)| / k``, in [0, 1]."""
    if feats_a.ndim != 2 or feats_b.ndim != 2:
        raise ValueError(f"mutual_knn expects 2-D [N, D] inputs, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"mutual_knn needs the same N on both sides, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    num = feats_a.shape[0]
    overlap = knn_overlap(knn_indices(feats_a, k), knn_indices(feats_b, k), num)
    return float(overlap.mean())
