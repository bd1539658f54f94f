"""HARC's loss terms (the authors' ``main/losses.py``, re-derived), on one micro-batch.

Coupling, margin ``m``, per selected layer then averaged over layers: with ``c_ref = cos(h_post, v_ref)`` and
``c_harm = cos(h_inst, v_harm)``, a harmful row costs ``relu(m - c_ref) + relu(m - c_harm)``, a retain row (harmless
or pseudo) ``relu(c_ref) + relu(c_harm)``; a layer's loss is the mean over all rows. The response side reads one pooled
response residual against ``v_ref_resp`` and ``v_harm_resp``. Directions are detached; cosines are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cosine(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[B]`` cosines of ``rows`` ``[B, D]`` with ``direction`` ``[D]`` (float32, eps 1e-8), moved from the CPU to
    the rows' device."""
    direction = direction.detach().to(device=rows.device, dtype=torch.float32)
    return F.cosine_similarity(rows.float(), direction.unsqueeze(0).expand(rows.shape[0], -1), dim=-1, eps=1e-8)


def coupling_loss(
    ref_rows: dict[int, torch.Tensor],
    harm_rows: dict[int, torch.Tensor],
    v_ref: torch.Tensor,
    v_harm: torch.Tensor,
    harmful: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Mean over layers of the per-row coupling (module docstring).

    ``ref_rows[l]`` / ``harm_rows[l]``: ``[B, D]`` residuals read against ``v_ref[l]`` / ``v_harm[l]`` (prompt side
    ``h_post`` / ``h_inst``; response side the pooled residual for both); ``v_ref`` / ``v_harm`` ``[L, D]``;
    ``harmful`` ``[B]`` bool.
    """
    per_layer = []
    for layer in sorted(ref_rows):
        c_ref = _cosine(ref_rows[layer], v_ref[layer])
        c_harm = _cosine(harm_rows[layer], v_harm[layer])
        pushed = torch.relu(margin - c_ref) + torch.relu(margin - c_harm)
        kept_off = torch.relu(c_ref) + torch.relu(c_harm)
        per_layer.append(torch.where(harmful.to(c_ref.device), pushed, kept_off).mean())
    return torch.stack(per_layer).mean()


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of KL(reference || current) over ``mask`` ``[N, T]``; logits ``[N, T, V]`` of the current and the
    adapter-disabled model on the same rows. As the reference, the logits at the response tokens' own positions (not
    those predicting them)."""
    reference = F.log_softmax(reference_logits.detach().float(), dim=-1)
    current = F.log_softmax(logits.float(), dim=-1)
    per_token = (reference.exp() * (reference - current)).sum(-1)
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def refusal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labelled tokens: ``logits`` ``[N, T, V]``, ``labels`` ``[N, T]`` (-100: none; position
    t predicts t + 1)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
