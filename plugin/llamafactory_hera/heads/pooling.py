"""Which tokens a head's representation averages: only after the sample's first multimodal placeholder, never a
placeholder (docs/hera-design.md, "Which tokens")."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

import torch

from llamafactory_hera.runtime.errors import RecipeError

IGNORE_INDEX = -100
POOLINGS = ("assistant", "text")

# config attributes holding one multimodal token id: image_token_id, vision_start_token_id, boi_token_index, ...
_CONFIG_TOKEN_ATTR = re.compile(r"^(image|video|vision|audio|boi|eoi|boa|eoa)\w*_token_(id|index)$")
# processor / mm_plugin attributes holding one token string
_STRING_TOKEN_ATTR = re.compile(
    r"^((image|video|vision|audio)\w*_token|(start|end)_(image|video)_token|"
    r"(boi|eoi|boa|eoa)_token|\w*context_image_token)$"
)


def _config_token_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for cfg in (config, config.get_text_config()):
        for name, value in vars(cfg).items() if hasattr(cfg, "__dict__") else ():
            if _CONFIG_TOKEN_ATTR.match(name) and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                ids.add(value)
    return ids


def _string_tokens(holder: Any) -> set[str]:
    tokens: set[str] = set()
    if holder is None:
        return tokens
    for name in dir(holder):
        if name.startswith("__") or not _STRING_TOKEN_ATTR.match(name):
            continue
        try:
            value = getattr(holder, name)
        except Exception:  # noqa: BLE001 - unreadable: no token
            continue
        if isinstance(value, str) and value:
            tokens.add(value)
    return tokens


def multimodal_token_ids(
    config: Any, processor: Any = None, tokenizer: Any = None, mm_plugin: Any = None
) -> frozenset[int]:
    """From the configs, and ``processor``'s and ``mm_plugin``'s token strings."""
    ids = _config_token_ids(config)
    tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    strings = _string_tokens(processor) | _string_tokens(mm_plugin)
    if tokenizer is not None:
        unk = getattr(tokenizer, "unk_token_id", None)
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        for token in strings:
            token_id = vocab.get(token)
            if token_id is None:
                converted = tokenizer.convert_tokens_to_ids(token)
                token_id = converted if isinstance(converted, int) and converted != unk else None
            if token_id is not None:
                ids.add(int(token_id))
    return frozenset(ids)


def require_multimodal_ids(ids: frozenset[int], model_type: str) -> frozenset[int]:
    """Empty ``ids`` would leave every pooling mask empty, the run plain SFT with a warning per micro-batch."""
    if not ids:
        raise RecipeError(
            f"stage: hera: found no multimodal placeholder token (image_token_id / image_token_index / video_token_id "
            f"...) in the config of model_type '{model_type}', its processor or the template's mm_plugin, so HeRA "
            "cannot tell where a sample's image is and would pool nothing. Use a multimodal model with its "
            "LLaMA-Factory template (e.g. template: qwen2_vl, llava)."
        )
    return ids


def multimodal_positions(input_ids: torch.Tensor, multimodal_ids: Collection[int]) -> torch.Tensor:
    """``[B, T]`` bool."""
    if not multimodal_ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    table = torch.tensor(sorted(multimodal_ids), device=input_ids.device, dtype=input_ids.dtype)
    return torch.isin(input_ids, table)


def pooled_token_mask(
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pooling: str,
    multimodal_ids: Iterable[int] | int | None,
) -> torch.Tensor:
    """``[B, T]`` bool. ``labels`` ``[B, T]`` unshifted (-100: no loss); ``attention_mask`` ``[B, T]`` or None."""
    if pooling not in POOLINGS:
        raise ValueError(f"hera_pooling must be 'assistant' or 'text', got {pooling!r}")
    if multimodal_ids is None:
        multimodal_ids = ()
    elif isinstance(multimodal_ids, int):
        multimodal_ids = (multimodal_ids,)
    placeholder = multimodal_positions(input_ids, frozenset(multimodal_ids))
    after_first = placeholder.long().cumsum(-1) > 0  # at or after the first placeholder
    if pooling == "assistant":
        return (labels != IGNORE_INDEX) & after_first & ~placeholder
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None and attention_mask.ndim == 2:
        mask = attention_mask.bool()
    return mask & after_first & ~placeholder


def pooling_weights(token_mask: torch.Tensor) -> torch.Tensor:
    """Row-normalised float32 weights ``[B, T]`` (empty rows stay 0)."""
    mask = token_mask.float()
    return mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
