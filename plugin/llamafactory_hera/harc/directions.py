"""HARC's directions: unit difference-of-means (:func:`unit`, as the reference) of the residual entering each layer.

Prompt side (prompts only)::

    v_harm[l] = unit(mean_harmful h_l(t_inst) - mean_harmless h_l(t_inst))
    v_ref[l]  = unit(mean_harmful h_l(t_post) - mean_harmless h_l(t_post))

Response side (prompt + answer, residual averaged over the first ``n`` answer tokens)::

    v_harm_resp[l] = unit(mean(harmful prompt + harmful completion) - mean(harmless prompt + helpful answer))
    v_ref_resp[l]  = unit(mean(harmful prompt + refusal) - mean(harmless prompt + helpful answer))

Means accumulate in float64, without padding. Refreshes blend with the base (:func:`blend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamafactory_hera.harc.batches import collate_rows
from llamafactory_hera.harc.data import ROLE_HARMLESS, EncodedRow
from llamafactory_hera.harc.residuals import at_positions, reading_layers, response_window
from llamafactory_hera.heads.architecture import text_decoder
from llamafactory_hera.runtime.log import Progress
from llamafactory_hera.training.eval_forward import eval_mode


@dataclass
class Directions:
    """Unit directions per layer, ``[L, D]`` float32; the response pair is None when response coupling is off."""

    v_ref: torch.Tensor
    v_harm: torch.Tensor
    v_ref_resp: torch.Tensor | None = None
    v_harm_resp: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in vars(self).items() if value is not None}


def unit(difference: torch.Tensor) -> torch.Tensor:
    """``difference / (||difference|| + 1e-8)`` along the last axis."""
    return difference / (difference.norm(dim=-1, keepdim=True) + 1e-8)


def blend(base: torch.Tensor, fresh: torch.Tensor, beta: float) -> torch.Tensor:
    """``normalize((1 - beta) base + beta fresh)`` along the last axis (a refresh anchored on the base)."""
    return F.normalize((1.0 - beta) * base + beta * fresh, dim=-1)


def _hidden_sums(
    model: nn.Module,
    rows: list[EncodedRow],
    layers: list[int],
    answer_tokens: int,
    pick: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    batch_size: int,
    pad_id: int,
    progress: Progress,
    label: str,
) -> dict[int, torch.Tensor]:
    """layer -> float64 sum over ``rows`` of ``pick(layer, hidden [B, T, D], batch)`` (``[B, ...]``), eval mode (as
    the reference). Only the first ``answer_tokens`` answer tokens are fed: causal attention keeps the read ones."""
    sums: dict[int, torch.Tensor] = {}
    batch: dict[str, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        total = pick(layer, hidden, batch).double().sum(0)
        sums[layer] = sums[layer] + total if layer in sums else total

    device = next(model.parameters()).device
    cut = [EncodedRow(row.prompt_ids, row.response_ids[:answer_tokens], row.t_inst) for row in rows]
    with eval_mode(model), torch.no_grad(), reading_layers(model, layers, read):
        for group in progress([cut[i : i + batch_size] for i in range(0, len(cut), batch_size)], label):
            batch = collate_rows([(ROLE_HARMLESS, row) for row in group], pad_id)
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            )
    return sums


def prompt_means(
    model: nn.Module, rows: list[EncodedRow], batch_size: int, pad_id: int, progress: Progress, label: str
) -> torch.Tensor:
    """``[L, 2, D]`` float64: mean residual entering each layer at ``t_inst`` (0) and ``t_post`` (1); prompts only."""
    layers = list(range(len(text_decoder(model).layers)))
    sums = _hidden_sums(
        model,
        rows,
        layers,
        0,
        lambda _, hidden, batch: torch.stack(
            [at_positions(hidden, batch["harc_t_inst"]), at_positions(hidden, batch["harc_t_post"])], dim=1
        ),
        batch_size,
        pad_id,
        progress,
        label,
    )
    return torch.stack([sums[layer] for layer in layers]).cpu() / len(rows)


def response_means(
    model: nn.Module,
    rows: list[EncodedRow],
    num_tokens: int,
    batch_size: int,
    pad_id: int,
    progress: Progress,
    label: str,
) -> torch.Tensor:
    """``[L, D]`` float64: mean residual entering each layer over the first ``num_tokens`` answer tokens."""

    def pooled(_: int, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        window = response_window(batch["harc_response_mask"], num_tokens).to(hidden.device, torch.float64)
        return torch.einsum("bt,btd->bd", window, hidden.double())

    layers = list(range(len(text_decoder(model).layers)))
    sums = _hidden_sums(model, rows, layers, num_tokens, pooled, batch_size, pad_id, progress, label)
    return torch.stack([sums[layer] for layer in layers]).cpu() / len(rows)


@dataclass
class ExtractionRows:
    """Held-out extraction rows, fixed for the run (base and every refresh)."""

    harmful_prompts: list[EncodedRow]
    harmless_prompts: list[EncodedRow]
    refusals: list[EncodedRow]  # harmful prompt + refusal
    helpful: list[EncodedRow]  # harmless prompt + helpful answer
    completions: list[EncodedRow] | None  # harmful prompt + harmful completion; None: response coupling off


def extract(
    model: nn.Module, rows: ExtractionRows, num_tokens: int, batch_size: int, pad_id: int, progress: Progress
) -> Directions:
    """Every direction of the module docstring, float32 ``[L, D]``."""
    harmful = prompt_means(model, rows.harmful_prompts, batch_size, pad_id, progress, "HARC directions: harmful")
    harmless = prompt_means(model, rows.harmless_prompts, batch_size, pad_id, progress, "HARC directions: harmless")
    prompt = unit(harmful - harmless).float()
    found = Directions(v_ref=prompt[:, 1].contiguous(), v_harm=prompt[:, 0].contiguous())
    if rows.completions is not None:
        helpful = response_means(
            model, rows.helpful, num_tokens, batch_size, pad_id, progress, "HARC directions: helpful answers"
        )
        refusal = response_means(
            model, rows.refusals, num_tokens, batch_size, pad_id, progress, "HARC directions: refusals"
        )
        completion = response_means(
            model, rows.completions, num_tokens, batch_size, pad_id, progress, "HARC directions: harmful completions"
        )
        found.v_ref_resp = unit(refusal - helpful).float()
        found.v_harm_resp = unit(completion - helpful).float()
    return found


def blended(base: Directions, fresh: Directions, beta: float) -> Directions:
    pairs = {name: blend(value, getattr(fresh, name), beta) for name, value in base.tensors().items()}
    return Directions(**pairs)


def validation_cosines(
    model: nn.Module,
    harmful: list[EncodedRow],
    harmless: list[EncodedRow],
    directions: Directions,
    layers: list[int],
    batch_size: int,
    pad_id: int,
    progress: Progress,
) -> dict[str, dict[str, float]]:
    """The reference's ``project_validation``: per coupled layer ``l``, held-out harmful and harmless prompts' mean
    ``cos(h_l(t_post), v_ref[l])`` (``<group>_ref``) and ``cos(h_l(t_inst), v_harm[l])`` (``<group>_harm``)."""

    def cosines(layer: int, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # [B, 2]
        post = at_positions(hidden, batch["harc_t_post"]).float()
        inst = at_positions(hidden, batch["harc_t_inst"]).float()
        return torch.stack(
            [
                F.cosine_similarity(post, directions.v_ref[layer].to(post.device)[None], dim=-1),
                F.cosine_similarity(inst, directions.v_harm[layer].to(inst.device)[None], dim=-1),
            ],
            1,
        )

    means = {}
    for name, rows in (("harmful", harmful), ("harmless", harmless)):
        sums = _hidden_sums(model, rows, layers, 0, cosines, batch_size, pad_id, progress, f"HARC validation: {name}")
        means[name] = {layer: (sums[layer] / len(rows)).tolist() for layer in layers}
    return {
        str(layer): {
            f"{name}_{key}": round(means[name][layer][k], 6)
            for key, k in (("ref", 0), ("harm", 1))
            for name in ("harmful", "harmless")
        }
        for layer in layers
    }
