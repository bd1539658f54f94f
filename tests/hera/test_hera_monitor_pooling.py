"""The monitor's and the selection's collection of pooled ``o_proj`` inputs, as a training forward runs it: under bf16
autocast (pooling stays float32) and on a PEFT-wrapped model (the probe forward keeps only the last logits)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.hera.selection import collect

FAMILY = "qwen2_5_vl"
CAPTIONS = ["A red boat on a calm sea.", "Two cats sleep on a sofa.", "A tall tree in the snow at dusk."]


@pytest.fixture(scope="module")
def tiny(assets) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(assets.models[FAMILY], torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(assets.models[FAMILY])


def test_pooling_is_float32_inside_bf16_autocast(tiny) -> None:
    """Under CPU bf16 autocast (the training forward the monitor scores in), the pooled rows are float32 and equal a
    float64 brute-force pooling of the same (bf16) ``o_proj`` inputs; an autocast einsum would round them to bf16."""
    model, tokenizer = tiny
    pairs = [collect.CalibrationPair(row, caption, ()) for row, caption in enumerate(CAPTIONS)]
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, args, _o, i=i: seen.__setitem__(i, args[0].detach().clone()))
               for i, m in head_projections(model).items()]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = collect.collect_text(model, tokenizer, pairs, len(pairs), "cpu", progress=False)
    finally:
        for handle in handles:
            handle.remove()
    encoded = tokenizer(CAPTIONS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    mask = (encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()).double()
    weights = mask / mask.sum(dim=1, keepdim=True)
    assert seen and all(x.dtype == torch.bfloat16 for x in seen.values())  # the forward did run in bf16
    for layer, x in seen.items():
        reference = (weights[:, :, None] * x.double()).sum(dim=1)  # [B, H*dh]
        assert pooled[layer].dtype == torch.float32
        torch.testing.assert_close(pooled[layer].double(), reference, rtol=1e-6, atol=1e-7)


def test_probe_forward_under_peft_keeps_only_the_last_logits(assets) -> None:
    """A LoRA run's monitor scores the PEFT-wrapped model, whose forward takes ``**kwargs`` only: the multimodal
    probe forward must still pass ``logits_to_keep=1`` (full-vocabulary logits of a 7B batch are ~15 GB)."""
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from conftest import base_recipe
    from llamafactory_hera.hera.selection.select import SelectionOptions, prepare
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    recipe_args = parse_recipe(base_recipe(assets, FAMILY, Path("/unused")))
    options = SelectionOptions(num_samples=6, k=3, batch_size=3, mode="multimodal", teacher=str(assets.teacher),
                               progress=False)
    pairs, _ = prepare(recipe_args, options)
    model, tokenizer_module, template = load_model_for_scoring(recipe_args, "cpu")
    dataset, collator = multimodal_dataset_and_collator(recipe_args, model, tokenizer_module, template, 0,
                                                        [p.row for p in pairs])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"]))
    lengths: list[int] = []
    head = peft_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: lengths.append(out.shape[1]))
    try:
        pooled = collect.collect_multimodal(peft_model, dataset, collator, list(range(len(pairs))), 3, "cpu",
                                            progress=False)
    finally:
        handle.remove()
    assert pooled[0].shape[0] == len(pairs)
    assert lengths and set(lengths) == {1}, lengths
