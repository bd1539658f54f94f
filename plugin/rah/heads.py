"""Which heads RAH-LoRA calibrates (targets, Eq. 6-7) and from which same-layer heads (anchors, Eq. 8-11).

Shapes: score tables ``[L, H]`` over the calibrated layers; maps ``[H, P]`` (a head's mean text->image
attention over P image positions); V slices ``[H, d, D]`` (the head's KV-group rows of ``v_proj``), O slices
``[H, D, d]`` (the head's input columns of ``o_proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0-100) of a 1-D tensor, linear interpolation (numpy's default)."""
    return torch.quantile(values.float(), q / 100.0)


def targets_in_layer(isal_std: torch.Tensor, caf: torch.Tensor, isal_percentile: float = 15.0,
                     caf_percentile: float = 70.0) -> list[int]:
    """Heads of one layer with standardised I-SAL below its ``isal_percentile`` AND CAF above its
    ``caf_percentile`` (Eq. 6-7): weakly cross-modal yet influential. ``[H]``, ``[H]`` -> head indices."""
    low = isal_std < percentile(isal_std, isal_percentile)
    high = caf > percentile(caf, caf_percentile)
    return [int(h) for h in torch.nonzero(low & high).flatten()]


def anchor_candidates(isal_std: torch.Tensor, beta: float = 0.25,
                      exclude: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Same-layer heads with standardised I-SAL above ``beta`` (Eq. 8, ``mu + beta sigma`` on a standardised
    scale), never a target. ``[H]`` -> head indices."""
    return [int(h) for h in torch.nonzero(isal_std > beta).flatten() if int(h) not in exclude]


def similarity(target: int, candidates: list[int], maps: torch.Tensor, v_slices: torch.Tensor,
               o_slices: torch.Tensor, rho: float = 0.6, w_v: float = 0.7, w_o: float = 0.3) -> torch.Tensor:
    """``s = rho s_func + (1 - rho) (w_v cos(V) + w_o cos(O))`` of the target against each candidate (Eq. 9-11).

    ``s_func``: cosine of the mean text->image attention maps; ``cos(V)`` / ``cos(O)``: cosine of the flattened
    weight slices. Returns ``[len(candidates)]`` float32.
    """
    index = torch.tensor(candidates, dtype=torch.long)

    def cos(table: torch.Tensor) -> torch.Tensor:
        flat = table.float().flatten(1)
        return F.cosine_similarity(flat[target][None], flat[index], dim=-1)

    return rho * cos(maps) + (1 - rho) * (w_v * cos(v_slices) + w_o * cos(o_slices))


def top_anchors(scores: torch.Tensor, candidates: list[int], k: int = 3) -> list[tuple[int, float]]:
    """The ``k`` most similar candidates, most similar first (ties: lower head index first)."""
    values = scores.tolist()  # one host sync for the head, not one per candidate
    order = sorted(range(len(candidates)), key=lambda i: (-values[i], candidates[i]))
    return [(candidates[i], values[i]) for i in order[:k]]
