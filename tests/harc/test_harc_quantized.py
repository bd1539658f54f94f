"""``stage: harc`` on a bitsandbytes 4-bit model against its dequantized twin (the same weights, stored unquantized):
the reference forward (KL to the base model through the adapter switch), the directions and every logged term."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import harc_recipe, read_log_history

pytest.importorskip("bitsandbytes")
TERMS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce", "loss")


def _dequantized_twin(harc_assets: Any, folder: Path, bits: int) -> Path:
    """The tiny Llama-3 quantized as LLaMA-Factory's quantization_bit does it on the CPU (4: nf4, double quantization,
    float32 compute and storage; 8: LLM.int8 codes and row scales), dequantized and saved unquantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    shutil.copytree(harc_assets.models["llama3"], folder)
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantization)
    model = model.dequantize()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _run(harc_assets: Any, output: Path, **keys: Any) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    from llamafactory.train.tuner import run_exp

    run_exp(harc_recipe(harc_assets, "llama3", output, max_steps=2, gradient_accumulation_steps=1, harc_eval=False,
                        save_strategy="no", harc_extract_samples=4,
                        harc_refresh_steps=0, harc_batch_harmful=2, harc_batch_harmless=2, harc_batch_pseudo=1,
                        **keys))
    logs = [line for line in read_log_history(output) if "harc_kl" in line]
    return logs, torch.load(output / "harc_directions.pt", weights_only=False)["base"]


# 8-bit is left out: measured 2026-11-25, quantization_bit: 8 against its dequantized twin (transformers' dequantize(),
# within 7e-9 of codes * SCB / 127) differs by up to 6.3e-3 relative in the terms (couple 1.9e-3, couple_resp 6.3e-3,
# KL 4.0e-3, ce 4.7e-6) and 4e-3 in direction entries. The cause is bitsandbytes 0.50, not HARC: a Linear8bitLt on the
# CPU computes with its dequantized weight only in train mode; in eval mode (directions are extracted under eval) it
# runs LLM.int8, its inputs cast to float16 and quantized to int8 per row (6.6e-3 relative on one layer; tiny Llama-3
# logits 7.3e-3), so the dequantized twin is another model there (tests/hera/test_hera_projection_quantized.py pins it)
@pytest.mark.parametrize("bits", [4])
def test_harc_on_quantized_weights_equals_its_dequantized_twin(harc_assets: Any, tmp_path: Path, bits: int) -> None:
    """Two steps (the second one's KL is non-zero: the adapter moved), 4-bit against the dequantized twin: the base
    directions and every logged term agree (measured: 0 difference in each; bitsandbytes' CPU forward is the
    dequantized weight's matmul)."""
    twin = _dequantized_twin(harc_assets, tmp_path / "twin", bits)
    quantized_logs, quantized_dirs = _run(harc_assets, tmp_path / "q", quantization_bit=bits)
    twin_logs, twin_dirs = _run(harc_assets, tmp_path / "twin_run", model_name_or_path=str(twin))
    assert len(quantized_logs) == len(twin_logs) == 2 and twin_logs[-1]["harc_kl"] > 0
    differences = {key: max(abs(q[key] - t[key]) / max(abs(t[key]), 1e-3)
                            for q, t in zip(quantized_logs, twin_logs, strict=True)) for key in TERMS}
    directions = {name: float((quantized_dirs[name] - reference).abs().max()) for name, reference in twin_dirs.items()}
    print(f"relative term differences {bits}-bit vs dequantized:", differences, "directions:", directions)
    assert all(value <= 1e-5 for value in differences.values()), differences
    assert all(value <= 1e-5 for value in directions.values()), directions
