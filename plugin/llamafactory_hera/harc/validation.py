"""HARC's diagnostic on held-out prompts: how the residuals line up with the directions at the coupled layers.

For each coupled layer ``l``: the mean over held-out harmful (and harmless) prompts of ``cos(h_l(t_post), v_ref[l])``
and ``cos(h_l(t_inst), v_harm[l])`` (the reference's ``project_validation``). Coupling works when the harmful means
rise towards the margin and the harmless ones stay at or below zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamafactory_hera.harc.batches import chunks, collate_rows
from llamafactory_hera.harc.data import ROLE_HARMLESS, EncodedRow
from llamafactory_hera.harc.residuals import reading_layers


@torch.no_grad()
def _mean_cosines(model: nn.Module, rows: list[EncodedRow], directions: Any, layers: list[int], batch_size: int,
                  pad_id: int, progress: Any, label: str) -> dict[int, tuple[float, float]]:
    sums = {layer: torch.zeros(2, dtype=torch.float64) for layer in layers}

    def read(layer: int, hidden: torch.Tensor) -> None:
        at = torch.arange(hidden.shape[0], device=hidden.device)
        post = hidden[at, batch["harc_t_post"].to(hidden.device)].float()
        inst = hidden[at, batch["harc_t_inst"].to(hidden.device)].float()
        ref = F.cosine_similarity(post, directions.v_ref[layer].to(post.device).unsqueeze(0), dim=-1)
        harm = F.cosine_similarity(inst, directions.v_harm[layer].to(inst.device).unsqueeze(0), dim=-1)
        sums[layer] += torch.stack([ref.sum(), harm.sum()]).double().cpu()

    device = next(model.parameters()).device
    with reading_layers(model, layers, read):
        for group in progress(chunks([EncodedRow(r.prompt_ids, (), r.t_inst) for r in rows], batch_size), label):
            batch = collate_rows([(ROLE_HARMLESS, row) for row in group], pad_id)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    return {layer: (float(total[0]) / len(rows), float(total[1]) / len(rows)) for layer, total in sums.items()}


def validation_cosines(model: nn.Module, harmful: list[EncodedRow], harmless: list[EncodedRow], directions: Any,
                       layers: list[int], batch_size: int, pad_id: int, progress: Any) -> dict[str, dict[str, float]]:
    """``{"<layer>": {"harmful_ref", "harmless_ref", "harmful_harm", "harmless_harm"}}`` mean cosines (see above)."""
    training = model.training
    model.eval()
    try:
        bad = _mean_cosines(model, harmful, directions, layers, batch_size, pad_id, progress,
                            "HARC validation: harmful")
        good = _mean_cosines(model, harmless, directions, layers, batch_size, pad_id, progress,
                             "HARC validation: harmless")
    finally:
        model.train(training)
    return {str(layer): {"harmful_ref": round(bad[layer][0], 6), "harmless_ref": round(good[layer][0], 6),
                         "harmful_harm": round(bad[layer][1], 6), "harmless_harm": round(good[layer][1], 6)}
            for layer in layers}
