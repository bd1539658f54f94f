"""HeRA's multi-target InfoNCE loss (paper Eq. 4, 8, 9).

For one head and a batch of B image–caption pairs with student representations ``M`` and
teacher features ``t``::

    L_RA(i) = -(1/k) * sum_{j in N_k^t(i)} log( exp(s(M_i, M_j)/tau) / sum_{z != i} exp(s(M_i, M_z)/tau) )

``N_k^t(i)`` are the k nearest neighbours of image i among the other batch images in teacher
space (cosine, self excluded). The loss is averaged over the batch and over heads.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llamafactory_hera.hera.metrics import knn_indices

Similarity = Literal["cosine", "dot"]


def student_log_probs(student: torch.Tensor, temperature: float | torch.Tensor, similarity: Similarity) -> torch.Tensor:
    """Row-wise log-softmax of student similarities over the other batch members.

    Args:
        student: ``[H, B, D]`` head representations.
        temperature: scalar tau > 0 (float or 0-d tensor, may require grad).
        similarity: ``"cosine"`` (L2-normalised dot product) or ``"dot"`` (raw dot product).

    Returns:
        ``[H, B, B]`` float32 log-probabilities; the diagonal is ``-inf``.
    """
    feats = student.float()
    if similarity == "cosine":
        feats = F.normalize(feats, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    logits = feats @ feats.transpose(-1, -2) / temperature
    num = feats.shape[-2]
    self_mask = torch.eye(num, dtype=torch.bool, device=logits.device)
    return torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=-1)


def hera_loss_from_knn(
    student: torch.Tensor,
    neighbours: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """HeRA loss with precomputed teacher neighbours.

    Args:
        student: ``[H, B, D]`` head representations.
        neighbours: ``[B, k]`` indices of each sample's teacher neighbours (self excluded).
        temperature: tau.
        similarity: see :func:`student_log_probs`.

    Returns:
        0-d float32 tensor: mean over heads, samples and neighbours of ``-log p``.
    """
    log_probs = student_log_probs(student, temperature, similarity)
    index = neighbours.unsqueeze(0).expand(log_probs.shape[0], -1, -1)
    return -log_probs.gather(-1, index).mean()


def hera_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    k: int = 10,
    temperature: float | torch.Tensor = 0.07,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """HeRA contrastive loss, paper Eq. 4 averaged over the batch (and heads).

    Args:
        student: ``[B, D]`` or ``[H, B, D]`` per-head representations in the residual space.
        teacher: ``[B, E]`` frozen teacher features (e.g. DINOv2 [CLS]) of the same B images.
        k: teacher neighbours per sample; needs ``B >= k + 1``.
        temperature: tau (float or 0-d tensor).
        similarity: ``"cosine"`` (default) or ``"dot"``.

    Returns:
        0-d float32 tensor.
    """
    heads = student.unsqueeze(0) if student.ndim == 2 else student
    if heads.ndim != 3:
        raise ValueError(f"student must be [B, D] or [H, B, D], got shape {tuple(student.shape)}")
    if teacher.ndim != 2 or teacher.shape[0] != heads.shape[1]:
        raise ValueError(f"teacher must be [B, E] with B={heads.shape[1]}, got shape {tuple(teacher.shape)}")
    with torch.no_grad():
        neighbours = knn_indices(teacher, k)
    return hera_loss_from_knn(heads, neighbours, temperature, similarity)


def hera_loss_anchored(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_index: torch.Tensor,
    anchor_teacher: torch.Tensor,
    candidate_teacher: torch.Tensor,
    k: int,
    temperature: float | torch.Tensor = 0.07,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """HeRA loss of some anchors against a larger candidate set (global batch and/or a feature queue).

    Each anchor's positives are its k teacher neighbours among the candidates other than itself, and its
    softmax runs over those same candidates. With ``candidates == anchors`` this is :func:`hera_loss`.

    Args:
        anchors: ``[H, A, D]`` student representations of the anchors (carry the gradient).
        candidates: ``[H, C, D]`` student representations of the candidates (gathered and/or queued;
            queued ones are detached).
        anchor_index: ``[A]`` position of each anchor among the candidates, or -1 if it is not one of them.
        anchor_teacher: ``[A, E]`` teacher features of the anchors.
        candidate_teacher: ``[C, E]`` teacher features of the candidates.
        k: neighbours per anchor; needs ``C - 1 >= k``.
        temperature: tau.
        similarity: ``"cosine"`` or ``"dot"``.

    Returns:
        ``[A]`` float32 per-anchor losses, averaged over heads and neighbours (reduce as needed).
    """
    num_candidates = candidates.shape[-2]
    if not 1 <= k <= num_candidates - 1:
        raise ValueError(f"k={k} needs 1 <= k <= C-1 with C={num_candidates} candidates")
    a, c = anchors.float(), candidates.float()
    if similarity == "cosine":
        a, c = F.normalize(a, dim=-1), F.normalize(c, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    # [A, C]: True at each anchor's own column (none for -1); a comparison, so no boolean-mask indexing (a sync)
    columns = torch.arange(num_candidates, device=a.device)
    self_mask = anchor_index.to(a.device).unsqueeze(-1) == columns
    with torch.no_grad():
        t_a = F.normalize(anchor_teacher.float(), dim=-1)
        t_c = F.normalize(candidate_teacher.float(), dim=-1)
        teacher_sim = (t_a @ t_c.T).masked_fill(self_mask, float("-inf"))
        neighbours = teacher_sim.topk(k, dim=-1).indices  # [A, k]
    logits = (a @ c.transpose(-1, -2) / temperature).masked_fill(self_mask, float("-inf"))  # [H, A, C]
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, neighbours.unsqueeze(0).expand(log_probs.shape[0], -1, -1))  # [H, A, k]
    return -picked.mean(dim=(0, 2))
