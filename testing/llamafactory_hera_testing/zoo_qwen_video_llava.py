"""Tiny random-weight models of the Qwen-VL line and the video LLaVAs (tests only): Qwen2-VL, Qwen3-VL-MoE, Qwen3.5
dense and MoE (hybrid linear/full attention), LLaVA-NeXT-Video and Video-LLaVA; the GLM-V line and ERNIE-VL are in
:mod:`llamafactory_hera_testing.zoo_glm_ernie`. Each builder returns ``(model, processor)`` like the fixtures'
(:mod:`llamafactory_hera.fixtures.models`, whose parts they reuse): 2 decoder layers (one of each kind where a family
mixes them), width 64, a width-32 2-layer vision tower, the ~500-token tokenizer trained on the spot, a few image tokens
per 48 px image. :data:`ZOO_QWEN_VIDEO_LLAVA` maps LLaMA-Factory's family name to (template, builder).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llamafactory_hera.fixtures.models import (
    LLAVA_IMAGE_SIZE,
    LLAVA_PATCH,
    MERGE,
    QWEN3_PATCH,
    QWEN25_PATCH,
    FamilySpec,
    _clip_image_kwargs,
    _llava_config_kwargs,
    _llava_processor_kwargs,
    _qwen_processor,
    _qwen_token_ids,
    _qwen_vision,
    _text_kwargs,
)
from llamafactory_hera.fixtures.newer import newer
from llamafactory_hera.fixtures.tokenizer import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_LEADING_SPECIALS,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    bos_first,
    bpe_with,
    build_qwen_tokenizer,
    fast,
)
from llamafactory_hera_testing.families import LLAVA_NEXT_PINPOINTS

# llava-hf video checkpoints' chat template: images then videos before the text of each turn.
LLAVA_VIDEO_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace(
    "{{ '<image>\n' }}{% endfor %}",
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}",
)

# classes only newer transformers releases have (the family's tests skip on an older one)
Qwen3VLMoeConfig = newer("Qwen3VLMoeConfig")
Qwen3VLMoeForConditionalGeneration = newer("Qwen3VLMoeForConditionalGeneration")
Qwen3VLProcessor = newer("Qwen3VLProcessor")
Qwen3_5Config = newer("Qwen3_5Config")
Qwen3_5ForConditionalGeneration = newer("Qwen3_5ForConditionalGeneration")
Qwen3_5MoeConfig = newer("Qwen3_5MoeConfig")
Qwen3_5MoeForConditionalGeneration = newer("Qwen3_5MoeForConditionalGeneration")

Builder = Callable[[], tuple[PreTrainedModel, ProcessorMixin]]

# GQA (4 query heads, 2 KV heads) where the real model has it; head_dim 32 != 64 / 4 where it sets head_dim.
SPECS: dict[str, FamilySpec] = {
    "qwen2_vl": FamilySpec("qwen2_vl", 2, 64, 4, 2, 16, 4),
    "qwen3_vl_moe": FamilySpec("qwen3_vl_nothink", 2, 64, 4, 2, 32, 4),
    "qwen3_5": FamilySpec("qwen3_5", 2, 64, 4, 2, 32, 4),
    "qwen3_5_moe": FamilySpec("qwen3_5", 2, 64, 4, 2, 32, 4),
    # Vicuna-7B text models (Llama 2: multi-head attention, no GQA)
    "llava_next_video": FamilySpec("llava_next_video", 2, 64, 4, 4, 16, 24),
    "video_llava": FamilySpec("video_llava", 2, 64, 4, 4, 16, 4),
}

# Qwen3.5: a quarter of head_dim is rotated (real: 256 -> 64 = 2 x [11, 11, 10]; here 32 -> 8 = 2 x [2, 1, 1]).
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True}
# Qwen3.5's gated-delta-net (linear attention) layers: 2 key heads of 16, 4 value heads of 16, conv kernel 4.
QWEN3_5_LINEAR = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                  "linear_num_key_heads": 2, "linear_num_value_heads": 4}
# Four tiny routed experts of width 32, two picked per token (MoE families).
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def _build_qwen2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["qwen2_vl"]
    tok = build_qwen_tokenizer(QWEN2_VL_CHAT_TEMPLATE)
    text = _text_kwargs(spec, tok) | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    }
    # Qwen2-VL's tower: embed_dim / hidden_size (the merger's output width is the text width).
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": spec.hidden_size, "mlp_ratio": 2, "num_heads": 2,
              "patch_size": QWEN25_PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    model = Qwen2VLForConditionalGeneration(config)
    processor = _qwen_processor(Qwen2VLProcessor, tok, QWEN25_PATCH, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))
    return model, processor


def _build_qwen3_vl_moe() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["qwen3_vl_moe"]
    tok = build_qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    text = _text_kwargs(spec, tok) | TINY_MOE | {
        "head_dim": spec.head_dim,
        "decoder_sparse_step": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                            "mrope_interleaved": True},
    }
    vision = _qwen_vision(spec, QWEN3_PATCH) | {"num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
    model = Qwen3VLMoeForConditionalGeneration(
        Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok)))
    return model, _qwen_processor(Qwen3VLProcessor, tok, QWEN3_PATCH, [0.5] * 3, [0.5] * 3)


def _build_qwen3_5(moe: bool) -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["qwen3_5_moe" if moe else "qwen3_5"]
    tok = build_qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    text = _text_kwargs(spec, tok) | QWEN3_5_LINEAR | {
        "head_dim": spec.head_dim,
        "layer_types": ["linear_attention", "full_attention"],
        "rope_parameters": dict(QWEN3_5_ROPE),
    }
    if moe:
        text |= TINY_MOE | {"shared_expert_intermediate_size": 32}
        del text["intermediate_size"]
    vision = _qwen_vision(spec, QWEN3_PATCH) | {"num_position_embeddings": 64}
    config_cls, model_cls = ((Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if moe
                             else (Qwen3_5Config, Qwen3_5ForConditionalGeneration))
    model = model_cls(config_cls(text_config=text, vision_config=vision, **_qwen_token_ids(tok)))
    return model, _qwen_processor(Qwen3VLProcessor, tok, QWEN3_PATCH, [0.5] * 3, [0.5] * 3)


def _llava_video_tokenizer() -> PreTrainedTokenizerFast:
    """Llama/LLaVA-style tokenizer (``<unk>``, ``<s>``, ``</s>`` first, bos added) ending in ``<image>``, ``<video>``,
    ``<pad>``, as the Vicuna-based llava-hf video checkpoints."""
    tok = bpe_with(("<image>", "<video>", "<pad>"), leading=LLAVA_LEADING_SPECIALS)
    bos_first(tok, "<s>")
    return fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                extra_special_tokens=["<image>", "<video>"], chat_template=LLAVA_VIDEO_CHAT_TEMPLATE)


def _vicuna_text(spec: FamilySpec, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(**_text_kwargs(spec, tok), bos_token_id=tok.bos_token_id)


def _build_llava_next_video() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["llava_next_video"]
    tok = _llava_video_tokenizer()
    config = LlavaNextVideoConfig(
        text_config=_vicuna_text(spec, tok), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        video_token_index=tok.convert_tokens_to_ids("<video>"), spatial_pool_stride=2,
        video_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH // 2) ** 2 * 8, **_llava_config_kwargs(tok))
    model = LlavaNextVideoForConditionalGeneration(config)
    image = LlavaNextImageProcessor(**_clip_image_kwargs(), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    video = LlavaNextVideoVideoProcessor(**_clip_image_kwargs())
    return model, LlavaNextVideoProcessor(video_processor=video, image_processor=image, **_llava_processor_kwargs(tok))


def _build_video_llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["video_llava"]
    tok = _llava_video_tokenizer()
    frame_tokens = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2 + 1  # patches + CLS per frame, 8 frames
    config = VideoLlavaConfig(
        text_config=_vicuna_text(spec, tok), video_token_index=tok.convert_tokens_to_ids("<video>"),
        video_seq_length=8 * frame_tokens, **_llava_config_kwargs(tok))
    model = VideoLlavaForConditionalGeneration(config)
    image = VideoLlavaImageProcessor(**_clip_image_kwargs())
    video = VideoLlavaVideoProcessor(**_clip_image_kwargs())
    return model, VideoLlavaProcessor(image_processor=image, video_processor=video, **_llava_processor_kwargs(tok))


_BUILDERS: dict[str, Builder] = {
    # Qwen/Qwen2-VL-7B-Instruct: 28 softmax-attention layers, GQA 28/4, head_dim 128 = hidden / heads
    "qwen2_vl": _build_qwen2_vl,
    # Qwen/Qwen3-VL-30B-A3B-Instruct: 48 softmax-attention layers, MoE (128 experts, 8 active), GQA 32/4, head_dim 128
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    # Qwen/Qwen3.5-9B: 3 gated-delta-net (linear attention) layers then 1 gated softmax one, repeated; head_dim 256
    "qwen3_5": lambda: _build_qwen3_5(moe=False),
    # Qwen/Qwen3.5-35B-A3B: the same hybrid mix, every MLP a MoE (256 experts, 8 active, one shared expert)
    "qwen3_5_moe": lambda: _build_qwen3_5(moe=True),
    # llava-hf/LLaVA-NeXT-Video-7B-hf: Vicuna-7B, 32 softmax-attention layers, MHA 32/32; anyres, pooled video frames
    "llava_next_video": _build_llava_next_video,
    # LanguageBind/Video-LLaVA-7B-hf: Vicuna-7B, 32 softmax-attention layers, MHA 32/32; image and video CLIP towers
    "video_llava": _build_video_llava,
}
# LLaMA-Factory family name -> (LLaMA-Factory template, builder)
ZOO_QWEN_VIDEO_LLAVA: dict[str, tuple[str, Builder]] = {
    name: (SPECS[name].template, builder) for name, builder in _BUILDERS.items()}
