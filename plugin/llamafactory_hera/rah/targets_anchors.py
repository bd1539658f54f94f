"""Which heads RAH-LoRA calibrates (targets, Eq. 6-7) and from which heads (anchors, Eq. 8-11).

Shapes: score tables ``[L, H]`` over the calibrated layers; maps ``[H, P]`` (text->image attention over P image
positions); V slices ``[H, d, D]`` (KV-group rows of ``v_proj``), O slices ``[H, D, d]`` (input columns of ``o_proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def targets_in_layer(
    isal_std: torch.Tensor, caf: torch.Tensor, isal_percentile: float = 15.0, caf_percentile: float = 70.0
) -> list[int]:
    """Heads of one layer with standardised I-SAL below ``isal_percentile`` AND CAF above ``caf_percentile`` (Eq. 6-7):
    weakly cross-modal yet influential. Percentiles interpolate linearly (numpy's default)."""
    low = isal_std < torch.quantile(isal_std.float(), isal_percentile / 100.0)
    high = caf > torch.quantile(caf.float(), caf_percentile / 100.0)
    return [int(h) for h in torch.nonzero(low & high).flatten()]


def anchor_candidates(
    isal_std: torch.Tensor, beta: float = 0.25, exclude: list[int] | tuple[int, ...] = ()
) -> list[int]:
    """Same-layer heads with standardised I-SAL above ``beta`` (Eq. 8's ``mu + beta sigma``), never a target."""
    return [int(h) for h in torch.nonzero(isal_std > beta).flatten() if int(h) not in exclude]


def anchor_pool(
    layer: int, head: int, candidates: dict[int, list[int]], group: int = 1, own_group: bool = True, adjacent: int = 0
) -> tuple[int | None, list[tuple[int, int]]]:
    """(distance in layers, [(layer, head)]) of a target's anchor candidates; ``(None, [])`` when none. Own layer
    first (Eq. 8), without its KV group's heads unless ``own_group``; else distance 1, 2, ... up to ``adjacent``."""
    own = [h for h in candidates.get(layer, []) if own_group or h // group != head // group]
    if own:
        return 0, [(layer, h) for h in own]
    for distance in range(1, adjacent + 1):
        pool = [(other, h) for other in (layer - distance, layer + distance) for h in candidates.get(other, [])]
        if pool:
            return distance, pool
    return None, []


def similarity(
    target: int,
    candidates: list[int],
    maps: torch.Tensor,
    v_slices: torch.Tensor,
    o_slices: torch.Tensor,
    rho: float = 0.6,
    w_v: float = 0.7,
    w_o: float = 0.3,
    shared_v: frozenset[int] | set[int] = frozenset(),
) -> torch.Tensor:
    """``[len(candidates)]`` float32 ``s = rho s_func + (1 - rho) (w_v cos(V) + w_o cos(O))`` (Eq. 9-11): ``s_func``
    the maps' cosine, ``cos(V)`` / ``cos(O)`` of flattened weight slices. ``shared_v``: candidates sharing the
    target's V slice (GQA: same KV group and layer), whose V cosine is 1 by construction: only ``cos(O)`` counts."""
    index = torch.tensor(candidates, dtype=torch.long)

    def cos(table: torch.Tensor) -> torch.Tensor:
        flat = table.float().flatten(1)
        return F.cosine_similarity(flat[target][None], flat[index], dim=-1)

    cos_v = cos(v_slices)
    cos_o = cos(o_slices)
    shared = torch.tensor([c in shared_v for c in candidates], device=cos_v.device)
    weights = torch.where(shared, cos_o, w_v * cos_v + w_o * cos_o)
    return rho * cos(maps) + (1 - rho) * weights


def top_anchors(scores: torch.Tensor, candidates: list[int], k: int = 3) -> list[tuple[int, float]]:
    """The ``k`` most similar candidates, most similar first (ties: lower head first)."""
    values = scores.tolist()  # one host sync per head
    order = sorted(range(len(candidates)), key=lambda i: (-values[i], candidates[i]))
    return [(candidates[i], values[i]) for i in order[:k]]
