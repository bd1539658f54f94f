"""Which tokens a head's representation pools: never a multimodal placeholder, never text the image cannot reach."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hera_teacher_identity import REUSED, reused_image_dataset
from transformers import AutoConfig, AutoProcessor

from conftest import base_recipe
from llamafactory_hera.heads.pooling import multimodal_token_ids, pooled_token_mask

# Independent of the code under test: a token whose text names an image, a video or the vision stream.
MULTIMODAL_TEXT = re.compile(r"image|video|vision|<img>|</img>|IMG_CONTEXT", re.IGNORECASE)


def _loop_mask(labels, input_ids, attention, pooling: str, placeholder_ids: set[int]) -> list[list[bool]]:
    rows = []
    for lab, ids, att in zip(labels.tolist(), input_ids.tolist(), attention.tolist(), strict=True):
        seen_image, row = False, []
        for label, token, attended in zip(lab, ids, att, strict=True):
            is_placeholder = token in placeholder_ids
            seen_image = seen_image or is_placeholder
            if pooling == "assistant":
                row.append(label != -100 and seen_image and not is_placeholder)
            else:
                row.append(bool(attended) and seen_image and not is_placeholder)
        rows.append(row)
    return rows


@pytest.mark.parametrize("pooling", ["assistant", "text"])
def test_mask_matches_a_per_token_loop(pooling: str) -> None:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 12, (6, 20), generator=gen)
    labels = torch.where(torch.rand(6, 20, generator=gen) < 0.5, input_ids, torch.full_like(input_ids, -100))
    attention = (torch.rand(6, 20, generator=gen) < 0.9).long()
    placeholders = {3, 7, 11}
    got = pooled_token_mask(labels, input_ids, attention, pooling, placeholders).tolist()
    assert got == _loop_mask(labels, input_ids, attention, pooling, placeholders)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_every_multimodal_token_of_the_model_is_found(assets, family: str) -> None:
    config = AutoConfig.from_pretrained(assets.models[family])
    processor = AutoProcessor.from_pretrained(assets.models[family])
    ids = multimodal_token_ids(config, processor)
    tokenizer = processor.tokenizer
    added = {token: i for i, token in ((i, t.content) for i, t in tokenizer.added_tokens_decoder.items())}
    # every added multimodal token, except Qwen's <|vision_pad|>, which LLaMA-Factory never puts in a sequence
    expected = {i for token, i in added.items() if MULTIMODAL_TEXT.search(token) and token != "<|vision_pad|>"}
    assert expected and expected <= ids
    assert all(MULTIMODAL_TEXT.search(tokenizer.convert_ids_to_tokens(i)) for i in ids)


class PoolProbe:
    """Records every training batch's pooled mask and input ids (wraps the collator's pooled_token_mask: the
    collator builds the mask on the host, the trainer pools exactly it, as ``hera_pooling_weights``)."""

    def __init__(self, monkeypatch) -> None:
        import llamafactory_hera.hera.collator as collator_module

        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        original = collator_module.pooled_token_mask

        def recording(labels, input_ids, attention_mask, pooling, ids):
            mask = original(labels, input_ids, attention_mask, pooling, ids)
            self.batches.append((mask.cpu(), input_ids.cpu(), labels.cpu()))
            return mask

        monkeypatch.setattr(collator_module, "pooled_token_mask", recording)


def _added_multimodal_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's added tokens whose text names an image, a video or the vision stream."""
    return {i for i, token in tokenizer.added_tokens_decoder.items() if MULTIMODAL_TEXT.search(token.content)}


def _pooled_texts(assets, family: str, probe: PoolProbe) -> tuple[list[str], int, int]:
    """(pooled multimodal tokens, pooled positions before the first image, pooled positions)."""
    tokenizer = AutoProcessor.from_pretrained(assets.models[family]).tokenizer
    multimodal = _added_multimodal_ids(tokenizer)
    pooled, before_image, total = [], 0, 0
    for mask, input_ids, _ in probe.batches:
        for row_mask, row_ids in zip(mask.tolist(), input_ids.tolist(), strict=True):
            first = next((i for i, t in enumerate(row_ids) if t in multimodal), None)
            for position, keep in enumerate(row_mask):
                if keep:
                    total += 1
                    if row_ids[position] in multimodal:
                        pooled.append(tokenizer.convert_ids_to_tokens(row_ids[position]))
                    before_image += int(first is None or position < first)
    return pooled, before_image, total


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("pooling", ["assistant", "text"])
def test_train_on_prompt_and_system_prompts_never_pool_image_or_pre_image_tokens(
        assets, tmp_path: Path, monkeypatch, family: str, pooling: str) -> None:
    from llamafactory.train.tuner import run_exp

    probe = PoolProbe(monkeypatch)
    data = reused_image_dataset(assets, tmp_path / "data")
    recipe: dict[str, Any] = base_recipe(assets, family, tmp_path / "out", dataset=REUSED, dataset_dir=str(data),
                                         train_on_prompt=True, hera_pooling=pooling, max_steps=2, max_samples=None)
    run_exp(recipe)
    pooled, before_image, total = _pooled_texts(assets, family, probe)
    assert total > 0
    assert pooled == []  # no multimodal placeholder token pooled
    assert before_image == 0  # system prompt and "USER:" before the image cannot depend on it


def test_a_model_without_multimodal_placeholders_is_refused() -> None:
    """No placeholder id: every mask would be empty (nothing lies after a first image), so the run is refused."""
    from transformers import LlamaConfig

    from llamafactory_hera.heads.pooling import require_multimodal_ids

    ids = multimodal_token_ids(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
    assert ids == frozenset()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    mask = pooled_token_mask(torch.tensor([[-100, 6, 7, 8]]), input_ids, torch.ones_like(input_ids), "assistant", ids)
    assert not mask.any()  # what the run would have pooled
    with pytest.raises(ValueError, match="found no multimodal placeholder token .* model_type 'llama'"):
        require_multimodal_ids(ids, "llama")
    assert require_multimodal_ids(frozenset({3}), "qwen2_5_vl") == frozenset({3})
