"""HARC's directions: unit difference-of-means of the residual stream entering every decoder layer.

Prompt side (prompts only, as the model sees them before answering)::

    v_harm[l] = unit(mean_harmful h_l(t_inst) - mean_harmless h_l(t_inst))
    v_ref[l]  = unit(mean_harmful h_l(t_post) - mean_harmless h_l(t_post))

Response side (prompt + answer, residual averaged over the first ``n`` answer tokens)::

    v_harm_resp[l] = unit(mean(harmful prompt + harmful completion) - mean(harmless prompt + helpful answer))
    v_ref_resp[l]  = unit(mean(harmful prompt + refusal) - mean(harmless prompt + helpful answer))

``unit(x) = x / (||x|| + 1e-8)`` as the reference. Means are accumulated in float64 over batches (rows are
right-padded; padding never enters a mean). Refreshes blend with the base directions:
``normalize((1 - beta) v_base + beta v_fresh)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamafactory_hera.harc.batches import chunks, collate_rows
from llamafactory_hera.harc.data import ROLE_HARMLESS, EncodedRow
from llamafactory_hera.harc.residuals import decoder_layers, reading_layers, response_window

Progress = Callable[[Iterable, str], Iterable]


@dataclass
class Directions:
    """Unit directions per decoder layer, ``[L, D]`` float32 each; the response pair is None when response coupling
    is off."""

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
    """``normalize((1 - beta) base + beta fresh)`` along the last axis (the refresh, anchored on the base)."""
    return F.normalize((1.0 - beta) * base + beta * fresh, dim=-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prompt_means(model: nn.Module, rows: list[EncodedRow], batch_size: int, pad_id: int, progress: Progress,
                 label: str) -> torch.Tensor:
    """``[L, 2, D]`` float64: mean residual entering each layer at ``t_inst`` (index 0) and ``t_post`` (index 1) of
    the prompts of ``rows`` (answers are not fed)."""
    layers = list(range(len(decoder_layers(model))))
    sums: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        at = torch.arange(hidden.shape[0], device=hidden.device)
        picked = torch.stack([hidden[at, batch["harc_t_inst"].to(hidden.device)],
                              hidden[at, batch["harc_t_post"].to(hidden.device)]], dim=1)  # [B, 2, D]
        total = picked.double().sum(0)
        sums[layer] = sums[layer] + total if layer in sums else total

    device = _device(model)
    with reading_layers(model, layers, read):
        for group in progress(chunks([EncodedRow(r.prompt_ids, (), r.t_inst) for r in rows], batch_size), label):
            batch = collate_rows([(ROLE_HARMLESS, row) for row in group], pad_id)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    return torch.stack([sums[layer] for layer in layers]).cpu() / len(rows)


@torch.no_grad()
def response_means(model: nn.Module, rows: list[EncodedRow], num_tokens: int, batch_size: int, pad_id: int,
                   progress: Progress, label: str) -> torch.Tensor:
    """``[L, D]`` float64: mean over ``rows`` of the residual entering each layer averaged over the row's first
    ``num_tokens`` answer tokens.

    Answers are fed only up to those tokens: under causal attention the residuals there do not depend on what
    follows, so the means are those of the whole rows (the reference feeds whole answers) at a fraction of the cost.
    """
    rows = [EncodedRow(row.prompt_ids, row.response_ids[:num_tokens], row.t_inst) for row in rows]
    layers = list(range(len(decoder_layers(model))))
    sums: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        weights = window.to(device=hidden.device, dtype=torch.float64)
        total = torch.einsum("bt,btd->d", weights, hidden.double())
        sums[layer] = sums[layer] + total if layer in sums else total

    device = _device(model)
    with reading_layers(model, layers, read):
        for group in progress(chunks(rows, batch_size), label):
            batch = collate_rows([(ROLE_HARMLESS, row) for row in group], pad_id)
            window = response_window(batch["harc_response_mask"], num_tokens)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    return torch.stack([sums[layer] for layer in layers]).cpu() / len(rows)


@dataclass
class ExtractionRows:
    """The held-out rows directions are extracted from (fixed for the run: base and every refresh use them)."""

    harmful_prompts: list[EncodedRow]  # prompt side, harmful
    harmless_prompts: list[EncodedRow]  # prompt side, harmless
    refusals: list[EncodedRow]  # harmful prompt + refusal (response side)
    helpful: list[EncodedRow]  # harmless prompt + helpful answer (response side)
    completions: list[EncodedRow] | None  # harmful prompt + harmful completion (response side); None: off


def extract(model: nn.Module, rows: ExtractionRows, num_tokens: int, batch_size: int, pad_id: int,
            progress: Progress) -> Directions:
    """Every direction of the module docstring on ``model`` as it is now (float32 ``[L, D]``)."""
    harmful = prompt_means(model, rows.harmful_prompts, batch_size, pad_id, progress, "HARC directions: harmful")
    harmless = prompt_means(model, rows.harmless_prompts, batch_size, pad_id, progress, "HARC directions: harmless")
    prompt = unit(harmful - harmless).float()
    found = Directions(v_ref=prompt[:, 1].contiguous(), v_harm=prompt[:, 0].contiguous())
    if rows.completions is not None:
        helpful = response_means(model, rows.helpful, num_tokens, batch_size, pad_id, progress,
                                 "HARC directions: helpful answers")
        refusal = response_means(model, rows.refusals, num_tokens, batch_size, pad_id, progress,
                                 "HARC directions: refusals")
        completion = response_means(model, rows.completions, num_tokens, batch_size, pad_id, progress,
                                    "HARC directions: harmful completions")
        found.v_ref_resp = unit(refusal - helpful).float()
        found.v_harm_resp = unit(completion - helpful).float()
    return found


def blended(base: Directions, fresh: Directions, beta: float) -> Directions:
    """Each direction of ``fresh`` blended with ``base``'s (:func:`blend`)."""
    pairs = {name: blend(value, getattr(fresh, name), beta) for name, value in base.tensors().items()}
    return Directions(**pairs)
