"""Benchmark assets: a small Qwen2.5-VL whose proportions resemble a real one, and a small DINOv2.

Built offline, deterministically, from the tiny test assets (tokenizer, processor, dataset):
text decoder width 512, 8 layers, 8 query heads of 64 (GQA with 2 KV heads), MLP 3x width
(Qwen3-8B: 4096 wide, 36 layers, 32 heads of 128, 8 KV heads, MLP 3x); teacher 96 wide, 4 layers,
112 px crops (64 patches). Per sample the teacher costs about 1.4 % of the LM's forward+backward,
a little more than DINOv2-L next to an 8B LLM (about 0.5 %), so the benchmark is conservative.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llamafactory_hera.fixtures import build_tiny_assets

TEXT = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
        "intermediate_size": 1536}
TEACHER = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 384,
           "image_size": 112}


@dataclass(frozen=True)
class BenchAssets:
    """Paths of the benchmark model, teacher and data."""

    model: Path
    teacher: Path
    dataset_dir: Path
    template: str


def build_bench_assets(root: Path, num_images: int = 64, seed: int = 0) -> BenchAssets:
    """Build (or reuse) the benchmark assets under ``root``."""
    from transformers import AutoConfig, AutoModel, Qwen2_5_VLForConditionalGeneration

    tiny = build_tiny_assets(root / f"tiny_{num_images}", seed=seed, num_images=num_images)
    model_dir, teacher_dir = root / "qwen2_5_vl_mid", root / "dinov2_small"
    stamp = root / "bench_stamp.json"
    wanted = {"text": TEXT, "teacher": TEACHER, "seed": seed, "num_images": num_images}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return BenchAssets(model_dir, teacher_dir, tiny.dataset_dir, tiny.templates["qwen2_5_vl"])
    for folder in (model_dir, teacher_dir):
        shutil.rmtree(folder, ignore_errors=True)
    source = tiny.models["qwen2_5_vl"]
    config = AutoConfig.from_pretrained(source)
    text = config.text_config
    for key, value in TEXT.items():
        setattr(text, key, value)
    text.layer_types = ["full_attention"] * TEXT["num_hidden_layers"]
    half = TEXT["hidden_size"] // TEXT["num_attention_heads"] // 2  # mRoPE sections cover head_dim / 2
    for rope in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
        if isinstance(rope, dict) and "mrope_section" in rope:
            rope["mrope_section"] = [half // 2, half // 4, half - half // 2 - half // 4]  # Qwen2.5-VL: [16, 24, 24]
    config.vision_config.out_hidden_size = TEXT["hidden_size"]
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(model_dir)
    for file in source.iterdir():
        if file.name not in {"config.json", "model.safetensors", "generation_config.json"}:
            shutil.copy(file, model_dir / file.name)
    teacher_config = AutoConfig.from_pretrained(tiny.teacher)
    for key, value in TEACHER.items():
        setattr(teacher_config, key, value)
    torch.manual_seed(seed + 1)
    AutoModel.from_config(teacher_config).save_pretrained(teacher_dir)
    processor = json.loads((tiny.teacher / "preprocessor_config.json").read_text())
    processor.update({"crop_size": {"height": 112, "width": 112}, "size": {"shortest_edge": 128}})
    (teacher_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    stamp.write_text(json.dumps(wanted))
    return BenchAssets(model_dir, teacher_dir, tiny.dataset_dir, tiny.templates["qwen2_5_vl"])
