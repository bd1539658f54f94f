"""Which decoder layers HARC couples: the top K within a band by the authors' code's score (``main/layers.py``; it
wins over HYPERPARAMS.md's formula). Per layer l (unit directions ``[D]``)::

    score(l) = (1 - |cos(v_ref, v_harm)|) (1 - |cos(v_ref_resp, v_harm_resp)|)
               |cos(v_harm, v_harm_resp)| |cos(v_ref, v_ref_resp)|

Without response directions the score is ``1 - |cos(v_ref, v_harm)|`` alone.
"""

from __future__ import annotations

import torch

from llamafactory_hera.runtime.errors import RecipeError


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``[L, D]`` tensors -> ``[L]``."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)


def layer_scores(
    v_ref: torch.Tensor, v_harm: torch.Tensor, v_ref_resp: torch.Tensor | None, v_harm_resp: torch.Tensor | None
) -> torch.Tensor:
    """``[L]`` scores from ``[L, D]`` directions (module docstring)."""
    score = 1.0 - _cos(v_ref, v_harm).abs()
    if v_ref_resp is not None and v_harm_resp is not None:
        score = score * (1.0 - _cos(v_ref_resp, v_harm_resp).abs())
        score = score * _cos(v_harm, v_harm_resp).abs() * _cos(v_ref, v_ref_resp).abs()
    return score


def eligible_layers(num_layers: int, band: int) -> list[int]:
    """Layers ``max(band, 1) .. min(num_layers - band, num_layers - 1)`` may be coupled; never layer 0, whose entering
    residual is the embedding output, which the adapter does not change."""
    return list(range(max(band, 1), min(num_layers - band, num_layers - 1) + 1))


def select_layers(scores: torch.Tensor, count: int, band: int) -> list[int]:
    """The ``count`` eligible layers of highest score, ascending (ties: lower layer first)."""
    eligible = eligible_layers(scores.numel(), band)
    if len(eligible) < count:
        raise RecipeError(
            f"harc_band: {band} leaves {len(eligible)} of {scores.numel()} decoder layers to choose "
            f"from, fewer than the {count} to couple (harc_layers / harc_layers_final). Lower harc_band."
        )
    ranked = sorted(eligible, key=lambda layer: (-float(scores[layer]), layer))
    return sorted(ranked[:count])
