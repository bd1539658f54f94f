"""The shipped recipes' models' config.json (their sizes as published on the Hub; never downloaded here), written
into a Hugging Face cache folder that ``AutoConfig.from_pretrained(..., local_files_only=True)`` reads, for
tests/test_plan.py's run of ``llamafactory-hera plan`` on every shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path


def _text(model_type: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **more) -> dict:
    return {"model_type": model_type, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, **more}


def _qwen_vl(model_type: str, text: dict, vision: dict) -> dict:
    return {"model_type": model_type, "text_config": text, "vision_config": vision, "image_token_id": 151655,
            "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "tie_word_embeddings": text.get("tie_word_embeddings", False)}


MROPE3 = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True}}
MROPE25 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN3_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16, "depth": 27,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [8, 16, 24]}
QWEN25_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "tokens_per_second": 2,
                 "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}
CLIP_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
            "projection_dim": 768}
INTERN_VIT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": [448, 448], "patch_size": [14, 14]}
LLAMA2_7B = _text("llama", 4096, 11008, 32, 32, 32, 32000)
LLAMA2_13B = _text("llama", 5120, 13824, 40, 40, 40, 32000)
LLAMA3_8B = _text("llama", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0)
QWEN25 = {"3b": _text("qwen2", 2048, 11008, 36, 16, 2, 151936, tie_word_embeddings=True),
          "7b": _text("qwen2", 3584, 18944, 28, 28, 4, 152064),
          "14b": _text("qwen2", 5120, 13824, 48, 40, 8, 152064)}
QWEN3 = {"4b": _text("qwen3", 2560, 9728, 36, 32, 8, 151936, head_dim=128, tie_word_embeddings=True),
         "8b": _text("qwen3", 4096, 12288, 36, 32, 8, 151936, head_dim=128),
         "14b": _text("qwen3", 5120, 17408, 40, 40, 8, 151936, head_dim=128)}


def _llava(text: dict, vocab: int, **more) -> dict:
    return {"model_type": "llava", "text_config": {**text, "vocab_size": vocab}, "vision_config": CLIP_336,
            "image_token_index": 32000, "image_seq_length": 576, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", **more}


def _internvl(text: dict) -> dict:
    return {"model_type": "internvl", "text_config": text, "vision_config": INTERN_VIT, "image_token_id": 151667,
            "downsample_ratio": 0.5, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False}


CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-VL-8B-Instruct": _qwen_vl("qwen3_vl", {**QWEN3["8b"], "model_type": "qwen3_vl_text", **MROPE3},
                                          {**QWEN3_VISION, "out_hidden_size": 4096}),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen_vl("qwen3_vl", {**QWEN3["4b"], "model_type": "qwen3_vl_text", **MROPE3},
                                          {**QWEN3_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                           "deepstack_visual_indexes": [5, 11, 17], "out_hidden_size": 2560}),
    **{f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct": _qwen_vl(
        "qwen2_5_vl", {**QWEN25[size], "model_type": "qwen2_5_vl_text", **MROPE25},
        {**QWEN25_VISION, "out_hidden_size": QWEN25[size]["hidden_size"]}) for size in ("3b", "7b")},
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen_vl(
        "qwen2_5_vl", {**_text("qwen2_5_vl_text", 8192, 29568, 80, 64, 8, 152064), **MROPE25},
        {**QWEN25_VISION, "intermediate_size": 3456, "out_hidden_size": 8192}),
    "Qwen/Qwen3.5-9B": {"model_type": "qwen3_5", "vision_config": {"out_hidden_size": 4096}},  # the class defaults
    "llava-hf/llava-1.5-7b-hf": _llava(LLAMA2_7B, 32064),
    "llava-hf/llava-1.5-13b-hf": _llava(LLAMA2_13B, 32064),
    "llava-hf/llama3-llava-next-8b-hf": {
        **_llava(LLAMA3_8B, 128320, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                          [336, 1008]]),
        "model_type": "llava_next", "image_token_index": 128256},
    "OpenGVLab/InternVL3-14B-hf": _internvl({**QWEN25["14b"], "vocab_size": 151674}),
    "OpenGVLab/InternVL3_5-8B-HF": _internvl(QWEN3["8b"]),
    "OpenGVLab/InternVL3_5-14B-HF": _internvl(QWEN3["14b"]),
    "google/gemma-3-12b-it": {
        "model_type": "gemma3", "mm_tokens_per_image": 256, "image_token_index": 262144,
        "text_config": _text("gemma3_text", 3840, 15360, 48, 16, 8, 262208, head_dim=256, sliding_window=1024),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                          "vision_use_head": False}},
    "meta-llama/Llama-3.1-8B-Instruct": {**LLAMA3_8B, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, "max_position_embeddings": 131072},
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B,
    "lmsys/vicuna-7b-v1.5": LLAMA2_7B,
    "lmsys/vicuna-13b-v1.5": LLAMA2_13B,
    **{f"Qwen/Qwen2.5-{size.upper()}-Instruct": QWEN25[size] for size in QWEN25},
    **{f"Qwen/Qwen3-{size.upper()}": QWEN3[size] for size in QWEN3},
    "google/siglip2-so400m-patch14-384": {
        "model_type": "siglip", "text_config": {}, "vision_config": {
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 384, "patch_size": 14}},
}


def hub_cache(root: Path) -> Path:
    """``CONFIGS`` as a Hugging Face hub cache under ``root`` (point ``HF_HUB_CACHE`` there)."""
    for name, config in CONFIGS.items():
        folder = root / f"models--{name.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text("0")
        (folder / "snapshots" / "0").mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / "0" / "config.json").write_text(json.dumps(config))
    return root
