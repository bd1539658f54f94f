"""Tiny random-weight models of the GLM-V line (GLM-4.1V, GLM-4.5V MoE, GLM-OCR) and ERNIE-4.5-VL (MoE) (tests only).
Built like :mod:`llamafactory_hera_testing.zoo_qwen_video_llava`: 2 decoder layers, width 64, a width-32 2-layer vision
tower, the ~500-token tokenizer trained on the spot with the family's special tokens, 4 image tokens per 48 px image.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llamafactory_hera.fixtures.models import MERGE, FamilySpec, _text_kwargs
from llamafactory_hera.fixtures.newer import newer
from llamafactory_hera.fixtures.tokenizer import bpe_with, fast

Builder = Callable[[], tuple[PreTrainedModel, ProcessorMixin]]

SPECS: dict[str, FamilySpec] = {
    "glm4v": FamilySpec("glm4v", 2, 64, 4, 2, 16, 4),
    # GLM-4.5V sets head_dim 128 with 96 heads on a 4096 width: here 32 with 4 heads on 64.
    "glm4v_moe": FamilySpec("glm4_5v", 2, 64, 4, 2, 32, 4),
    "glm_ocr": FamilySpec("glm_ocr", 2, 64, 4, 2, 16, 4),
    "ernie4_5_vl_moe": FamilySpec("ernie_vl", 2, 64, 4, 2, 16, 4),
}

# GLM-4.1V / 4.5V / OCR tokenizers: ChatGLM's turn and mask tokens, the vision wrappers; reasoning tags as text.
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
)
GLM_ADDED_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>")
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif content['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# classes only newer transformers releases have (the family's tests skip on an older one)
Ernie4_5_VLMoeConfig = newer("Ernie4_5_VLMoeConfig")
Ernie4_5_VLMoeForConditionalGeneration = newer("Ernie4_5_VLMoeForConditionalGeneration")
Ernie4_5_VLMoeImageProcessor = newer("Ernie4_5_VLMoeImageProcessor")
Ernie4_5_VLMoeProcessor = newer("Ernie4_5_VLMoeProcessor")
Ernie4_5_VLMoeVideoProcessor = newer("Ernie4_5_VLMoeVideoProcessor")
Glm4vMoeConfig = newer("Glm4vMoeConfig")
Glm4vMoeForConditionalGeneration = newer("Glm4vMoeForConditionalGeneration")
GlmOcrConfig = newer("GlmOcrConfig")
GlmOcrForConditionalGeneration = newer("GlmOcrForConditionalGeneration")
GLM_PATCH = 14  # 48 px -> 56 px (4x4 patches) -> 2x2 merged = 4 image tokens
# GLM-V rotates half of head_dim in three position sections (real: 128 -> 64 = 2 x [8, 12, 12]).
GLM_ROPE = {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}


def build_glm_tokenizer() -> PreTrainedTokenizerFast:
    """GLM-4.1V-style tokenizer: eos and pad ``<|endoftext|>``, no bos (the template writes ``[gMASK]<sop>``)."""
    tok = bpe_with(GLM_SPECIAL_TOKENS, GLM_ADDED_TOKENS)
    return fast(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                extra_special_tokens=[t for t in GLM_SPECIAL_TOKENS if t != "<|endoftext|>"],
                chat_template=GLM_CHAT_TEMPLATE)


def _glm_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    names = {"image_token_id": "<|image|>", "video_token_id": "<|video|>",
             "image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
             "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>"}
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _glm_vision(spec: FamilySpec) -> dict:
    """GLM-V's tower: 2 blocks of width 32, a 4x4 position grid (interpolated), merged 2x2 to the text width."""
    return {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "image_size": 4 * GLM_PATCH,
            "patch_size": GLM_PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
            "out_hidden_size": spec.hidden_size}


def _glm_processor(tok: PreTrainedTokenizerFast) -> ProcessorMixin:
    side = GLM_PATCH * MERGE
    common = {"patch_size": GLM_PATCH, "temporal_patch_size": 2, "merge_size": MERGE,
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
    # sizes bound temporal x height x width: 2 frames of 1x1 to 4x4 merged patches
    image = Glm4vImageProcessor(size={"shortest_edge": 2 * side**2, "longest_edge": 2 * (4 * side) ** 2}, **common)
    video = Glm4vVideoProcessor(size={"shortest_edge": 2 * side**2, "longest_edge": 8 * (4 * side) ** 2},
                                max_image_size={"longest_edge": 8 * (4 * side) ** 2}, **common)
    return Glm4vProcessor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=tok.chat_template)


def _build_glm(name: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS[name]
    tok = build_glm_tokenizer()
    text = _text_kwargs(spec, tok) | {"rope_parameters": GLM_ROPE | {"mrope_section": [1, 1, 2]}}
    if name == "glm4v_moe":
        text |= {"head_dim": spec.head_dim, "rope_parameters": GLM_ROPE | {"mrope_section": [2, 3, 3]},
                 "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
                 "first_k_dense_replace": 1}
    config_cls, model_cls = {
        "glm4v": (Glm4vConfig, Glm4vForConditionalGeneration),
        "glm4v_moe": (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration),
        "glm_ocr": (GlmOcrConfig, GlmOcrForConditionalGeneration),
    }[name]
    model = model_cls(config_cls(text_config=text, vision_config=_glm_vision(spec), **_glm_token_ids(tok)))
    return model, _glm_processor(tok)


# ERNIE-4.5-VL: the processor reads its six vision tokens as named tokenizer attributes.
ERNIE_NAMED_TOKENS: dict[str, str] = {
    "image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>", "image_end_token": "<|IMAGE_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>", "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>",
}
ERNIE_LEADING_SPECIALS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
ERNIE_SPECIAL_TOKENS: tuple[str, ...] = ("<|begin_of_sentence|>", "<|end_of_sentence|>", *ERNIE_NAMED_TOKENS.values())
ERNIE_CHAT_TEMPLATE = (
    "<|begin_of_sentence|>{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {% elif message['role'] == 'assistant' %}Assistant: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "Picture {{ image_count.value }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|end_of_sentence|>{% else %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def build_ernie_tokenizer() -> PreTrainedTokenizerFast:
    """ERNIE-4.5-style tokenizer: ``<unk>``, ``<s>``, ``</s>`` first, then BPE, sentence markers, the vision tokens."""
    tok = bpe_with(ERNIE_SPECIAL_TOKENS, leading=ERNIE_LEADING_SPECIALS)
    return fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                extra_special_tokens=dict(ERNIE_NAMED_TOKENS), chat_template=ERNIE_CHAT_TEMPLATE)


def _build_ernie4_5_vl_moe() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = SPECS["ernie4_5_vl_moe"]
    tok = build_ernie_tokenizer()
    text = _text_kwargs(spec, tok) | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0, "mrope_section": [3, 3, 2]},
        "mlp_layer_types": ["dense", "sparse"], "moe_intermediate_size": [32, 16], "moe_num_experts": 4, "moe_k": 2,
        "moe_num_shared_experts": 1,
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": GLM_PATCH,
              "spatial_merge_size": MERGE, "temporal_merge_size": 2}
    ids = {f"{key}_id": tok.convert_tokens_to_ids(token) for key, token in ERNIE_NAMED_TOKENS.items()}
    model = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **ids))
    side = GLM_PATCH * MERGE
    common = {"patch_size": GLM_PATCH, "merge_size": MERGE, "image_mean": list(OPENAI_CLIP_MEAN),
              "image_std": list(OPENAI_CLIP_STD)}
    image = Ernie4_5_VLMoeImageProcessor(size={"shortest_edge": side**2, "longest_edge": (4 * side) ** 2}, **common)
    # no timestamps drawn on frames: that needs a font file beside the processor
    video = Ernie4_5_VLMoeVideoProcessor(size={"shortest_edge": side**2, "longest_edge": 4 * (4 * side) ** 2},
                                         draw_on_frames=False, **common)
    processor = Ernie4_5_VLMoeProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                        chat_template=tok.chat_template)
    return model, processor


_BUILDERS: dict[str, Builder] = {
    # zai-org/GLM-4.1V-9B-Thinking: 40 softmax-attention layers (4 norms each, fused gate_up_proj), GQA 32/2
    "glm4v": lambda: _build_glm("glm4v"),
    # zai-org/GLM-4.5V: 46 softmax-attention layers, the first dense MLP, then MoE (128 experts, 8 active, 1 shared)
    "glm4v_moe": lambda: _build_glm("glm4v_moe"),
    # zai-org/GLM-OCR: 16 softmax-attention layers as GLM-4.1V's (4 norms each, fused gate_up_proj), GQA 16/8
    "glm_ocr": lambda: _build_glm("glm_ocr"),
    # baidu/ERNIE-4.5-VL-28B-A3B-PT: 28 softmax-attention layers, first dense, then text/vision-isolated MoE, GQA 20/4
    "ernie4_5_vl_moe": _build_ernie4_5_vl_moe,
}
# LLaMA-Factory family name -> (LLaMA-Factory template, builder); GLM-4.5V's template is glm4_5v
ZOO_GLM_ERNIE: dict[str, tuple[str, Builder]] = {
    name: (SPECS[name].template, builder) for name, builder in _BUILDERS.items()}
