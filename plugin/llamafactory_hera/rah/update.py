"""One head's calibration: representative anchor (Eq. 12), low-rank update (Eq. 13), trust region (Eq. 14-15).

Shapes: anchor slices ``[k, m, n]``; a head's slice ``W`` ``[m, n]`` (V: ``[d, D]`` KV-group rows; O: ``[D, d]``
columns); probe logits ``[n_positions, V]`` per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def trimmed_mean(stack: torch.Tensor, trim: float = 0.1) -> torch.Tensor:
    """Element-wise trimmed mean over dim 0 (Eq. 12): drop the ``floor(trim * k)`` lowest and highest of k values,
    average the rest (k = 3, trim 0.1: a plain mean)."""
    k = stack.shape[0]
    cut = math.floor(trim * k)
    if 2 * cut >= k:
        raise ValueError(f"rah_trim: got {trim}; with {k} anchors it would drop every value (allowed: < 0.5).")
    ordered = stack.float().sort(dim=0).values
    return ordered[cut : k - cut].mean(dim=0)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``delta`` ``[m, n]`` (Eq. 13): float32 (U ``[m, r]``, S ``[r]``, Vh ``[r, n]``),
    r capped at min(m, n)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.shape[0])
    return u[:, :r], s[:r], vh[:r]


def mean_kl(reference: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """E over samples of KL(p_reference || p) (Eq. 15): per sample the mean over its probe positions, then the mean
    over samples having any; float32 softmaxes."""
    per_sample = []
    for ref, cur in zip(reference, current, strict=True):
        if ref.shape[0] == 0:
            continue
        log_p = torch.log_softmax(ref.float(), dim=-1)
        log_q = torch.log_softmax(cur.float(), dim=-1)
        per_sample.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())
    return float(torch.stack(per_sample).mean()) if per_sample else 0.0  # one host sync


def lora_pair(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B ``[m, r]`` = ``alpha U sqrt(S)``, A ``[r, n]`` = ``sqrt(S) Vh``): ``B @ A`` is the step PEFT adds when it
    merges the adapter, and the trust region applies."""
    root = s.sqrt()
    return alpha * u * root, root[:, None] * vh


@dataclass(frozen=True)
class TrustRegion:
    """One head's alpha search; ``alpha`` 0 means rolled back."""

    alpha: float
    kl: float | None  # mean KL at ``alpha`` (None when rolled back)
    tried: tuple[tuple[float, float], ...]  # (alpha, mean KL) in order

    @property
    def rolled_back(self) -> bool:
        """No alpha fits: the head is unchanged."""
        return self.alpha == 0.0


def search_alpha(
    kl_at: Callable[[float], float], alpha_max: float = 0.15, delta: float = 0.05, halvings: int = 5
) -> TrustRegion:
    """The largest of ``alpha_max, alpha_max / 2, ...`` (``halvings`` halvings) with ``kl_at(alpha) <= delta``
    (Eq. 14-15); alpha 0 (rollback) if none."""
    tried = []
    alpha = alpha_max
    for _ in range(halvings + 1):
        kl = float(kl_at(alpha))
        tried.append((alpha, kl))
        if kl <= delta:
            return TrustRegion(alpha, kl, tuple(tried))
        alpha /= 2
    return TrustRegion(0.0, None, tuple(tried))
