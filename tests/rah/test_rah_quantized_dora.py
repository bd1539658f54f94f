"""RAH-LoRA with ``use_dora: true`` (a DoRA adapter of the same calibration, never a silent plain LoRA) and on
quantized models (refused before loading, with the reason: the trust region edits V and O weights in place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_rah_stage import _logits, _refusal, rah_recipe

from conftest import run_train


def test_use_dora_writes_a_dora_adapter_equal_to_the_calibration(assets, tmp_path: Path) -> None:
    """adapter_config says use_dora: true, the file holds each module's magnitude, and the model LLaMA-Factory loads
    with it equals the base model plus the adapter's B @ A added by hand (the calibrated W + alpha Delta)."""
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    out = tmp_path / "out"
    run_train(rah_recipe(assets, "llava", out, use_dora=True), tmp_path)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    pairs = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    assert pairs and len(magnitudes) == len(pairs), sorted(tensors)

    base_args = parse_recipe({**rah_recipe(assets, "llava", out), "stage": "sft"})
    by_hand, tokenizer_module, template = load_model_for_scoring(base_args, "cpu")
    by_hand = by_hand.float()
    with torch.no_grad():
        for prefix in pairs:
            name = prefix.removeprefix("base_model.model.")
            delta = tensors[f"{prefix}.lora_B.weight"].float() @ tensors[f"{prefix}.lora_A.weight"].float()
            assert delta.abs().max() > 0
            by_hand.get_submodule(name).weight += delta
    dataset, collator = multimodal_dataset_and_collator(base_args, by_hand, tokenizer_module, template, 0, [0])
    batch = collator([dataset[0]])
    adapted_args = parse_recipe({**rah_recipe(assets, "llava", out), "stage": "sft", "adapter_name_or_path": str(out),
                                 "use_dora": True})
    adapted, _, _ = load_model_for_scoring(adapted_args, "cpu")
    torch.testing.assert_close(_logits(adapted.float(), batch), _logits(by_hand, batch), rtol=0, atol=1e-5)


def test_quantized_models_are_refused_with_the_reason(assets, tmp_path: Path) -> None:
    for bits in (4, 8):
        assert (f"stage: rah cannot calibrate quantization_bit: {bits} with quantization_method: bnb: its trust region "
                "writes each head's W + alpha * Delta into the V and O weights in place"
                in _refusal(assets, tmp_path / str(bits), quantization_bit=bits))
    folder = tmp_path / "gptq"
    shutil.copytree(assets.models["llava"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                      "bits": 4}}))
    assert (f"stage: rah reads V and O weights per head, and model_name_or_path: {folder} (saved gptq-quantized: "
            "quantization_config in its config.json) cannot be read exactly: gptq stores packed codes"
            in _refusal(assets, tmp_path / "g", model_name_or_path=str(folder)))
