"""Tiny random-weight models of Pixtral, Mistral Small 3, Llama 3.2 Vision (mllama), Llama 4 and LFM2-VL (tests only),
and the parts the Gemma builders (:mod:`llamafactory_hera_testing.zoo_gemma`) share with them.
:data:`ZOO_LLAMA_MISTRAL_LFM` maps the LLaMA-Factory family name to (template name, builder).

Each builder returns ``(model, processor)`` like the fixtures' builders (:mod:`llamafactory_hera.fixtures.models`, whose
tokenizer helpers they reuse): a width-64 text model with the family's layer mix, a width-32, 2-layer vision tower and a
512-token tokenizer carrying the special tokens of the family's LLaMA-Factory template and processor. Processor sizes
give a few image tokens per 48 px image of the tiny dataset.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from llamafactory_hera.fixtures.newer import newer
from llamafactory_hera.fixtures.tokenizer import LLAMA3_SPECIAL_TOKENS, bos_first, bpe_with, fast

Builder = Callable[[], tuple[PreTrainedModel, ProcessorMixin]]

# ------------------------------------------------------------------------------------------------ shared parts

WIDTH, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 32  # head_dim 32 != 64 / 4: o_proj reads num_heads * head_dim = 128


def _text(tok: PreTrainedTokenizerFast, layers: int = 2, **extra: object) -> dict:
    """A width-64 GQA text config (4 query heads, 2 key-value heads, explicit head_dim 32) for ``tok``."""
    return {
        "vocab_size": len(tok), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    } | extra


def _image_size(side: int) -> dict:
    return {"height": side, "width": side}

# ------------------------------------------------------------------------------------------------ Pixtral, Mistral 3

# Mistral's Tekken layout: control tokens first ([IMG]=10 in the real vocabulary), then the text vocabulary.
MISTRAL_LEADING = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")

# mistral-community/pixtral-12b style: "[INST]...[/INST]answer</s>" with "[IMG]" per image (the processor expands it)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]{% elif message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}"
    "[/SYSTEM_PROMPT]{% else %}{{ message['content'] if message['content'] is string else "
    "message['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

# classes only newer transformers releases have (the family's tests skip on an older one)
Lfm2VlConfig = newer("Lfm2VlConfig")
Lfm2VlForConditionalGeneration = newer("Lfm2VlForConditionalGeneration")
Lfm2VlImageProcessor = newer("Lfm2VlImageProcessor")
Lfm2VlProcessor = newer("Lfm2VlProcessor")
Llama4ImageProcessor = newer("Llama4ImageProcessor", "Llama4ImageProcessorFast")


def build_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral (Tekken)-style tokenizer: the control tokens at ids 0-15 (``[IMG]`` = 10), then BPE; bos added."""
    tok = bpe_with((), leading=MISTRAL_LEADING)
    bos_first(tok, "<s>")
    return fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                extra_special_tokens=[t for t in MISTRAL_LEADING if t not in {"<unk>", "<s>", "</s>", "<pad>"}],
                chat_template=MISTRAL_CHAT_TEMPLATE)


PIXTRAL_PATCH = 8


def _pixtral_parts(longest_edge: int, merge: int) -> tuple[PreTrainedTokenizerFast, dict, dict, ProcessorMixin]:
    """Tokenizer, Mistral text config, tiny Pixtral vision config and processor (rows of ``[IMG]``, ``[IMG_BREAK]``
    between rows, ``[IMG_END]`` last; ``merge`` x ``merge`` patches per token)."""
    tok = build_mistral_tokenizer()
    text = _text(tok, model_type="mistral", rope_theta=1_000_000_000.0, sliding_window=None)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "head_dim": 16, "image_size": longest_edge, "patch_size": PIXTRAL_PATCH}
    image = PixtralImageProcessor(size={"longest_edge": longest_edge},
                                  patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH})
    processor = PixtralProcessor(image_processor=image, tokenizer=tok, patch_size=PIXTRAL_PATCH,
                                 spatial_merge_size=merge, chat_template=tok.chat_template)
    return tok, text, vision, processor


def _build_pixtral() -> tuple[PreTrainedModel, ProcessorMixin]:
    # mistral-community/pixtral-12b: LLaVA with a Pixtral vision tower and a Mistral-Nemo text model (40 layers of
    # full attention, GQA 32/8, head_dim 128 != 5120 / 32); 24 px images: 3x3 [IMG] + 3 breaks = 12 tokens
    tok, text, vision, processor = _pixtral_parts(24, 1)
    config = LlavaConfig(
        text_config=MistralConfig(**text), vision_config=PixtralVisionConfig(**vision),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=9,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_mistral_small() -> tuple[PreTrainedModel, ProcessorMixin]:
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral tower, 2x2 patch merger, Mistral text model (40 layers of
    # full attention, GQA 32/8, head_dim 128 != 5120 / 32); 32 px images: 2x2 merged tokens + 2 breaks = 6 tokens
    tok, text, vision, processor = _pixtral_parts(32, 2)
    config = Mistral3Config(
        text_config=text, vision_config=vision | {"model_type": "pixtral"},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config), processor


# ------------------------------------------------------------------------------------------------ Llama 3.2 Vision

MLLAMA_TRAILING = ("<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>")

# meta-llama/Llama-3.2-11B-Vision-Instruct style (without its default system block): "<|image|>" per image.
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_mllama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3.2 Vision-style tokenizer: BPE, the Llama-3 specials, ``<|python_tag|>``, the pad token and
    ``<|image|>`` last (as id 128256 in the real one); bos added on encode."""
    tok = bpe_with((*LLAMA3_SPECIAL_TOKENS, *MLLAMA_TRAILING))
    bos_first(tok, "<|begin_of_text|>")
    named = {"<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"}
    return fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                extra_special_tokens=[t for t in (*LLAMA3_SPECIAL_TOKENS, *MLLAMA_TRAILING) if t not in named],
                chat_template=MLLAMA_CHAT_TEMPLATE)


MLLAMA_TILE, MLLAMA_PATCH = 16, 8  # one 16 px tile of 2x2 patches (+ CLS) per image: cross-attended, not in the text


def _build_mllama() -> tuple[PreTrainedModel, ProcessorMixin]:
    # meta-llama/Llama-3.2-11B-Vision: 40 text layers, every 5th a cross-attention layer ([3, 8, 13, ...]) with no
    # self-attention, GQA 32/8, head_dim 128 = 4096 / 32; here layer 0 self-attention, layer 1 cross-attention
    tok = build_mllama_tokenizer()
    text = _text(tok, cross_attention_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})
    del text["head_dim"]  # MllamaTextConfig has none: hidden_size / num_attention_heads
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
              "attention_heads": 2, "image_size": MLLAMA_TILE, "patch_size": MLLAMA_PATCH, "max_num_tiles": 1,
              "supported_aspect_ratios": [[1, 1]], "intermediate_layers_indices": [0], "vision_output_dim": 64}
    config = MllamaConfig(text_config=text, vision_config=vision,
                          image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    image = MllamaImageProcessor(size=_image_size(MLLAMA_TILE), max_image_tiles=1)
    return MllamaForConditionalGeneration(config), MllamaProcessor(image, tok, chat_template=tok.chat_template)


# ------------------------------------------------------------------------------------------------ Llama 4

LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
                   "<|python_start|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                   "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")

# meta-llama/Llama-4-Scout-17B-16E-Instruct style: "<|image|>" per image (the processor expands it).
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def build_llama4_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 4-style tokenizer: BPE, then the header, turn and image tokens; bos added on encode."""
    tok = bpe_with(LLAMA4_SPECIALS)
    bos_first(tok, "<|begin_of_text|>")
    named = {"<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>"}
    return fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>",
                extra_special_tokens=[t for t in LLAMA4_SPECIALS if t not in named], chat_template=LLAMA4_CHAT_TEMPLATE)


LLAMA4_TILE, LLAMA4_PATCH = 32, 8  # one 32 px tile of 4x4 patches, pixel-shuffled (0.5) to 2x2 = 4 image tokens


def _build_llama4() -> tuple[PreTrainedModel, ProcessorMixin]:
    # meta-llama/Llama-4-Maverick-17B-128E: 48 layers, MoE every 2nd layer (dense MLP between), chunked attention with
    # RoPE on 3 of 4 layers and full attention without RoPE (no_rope_layers) on every 4th, GQA 40/8, head_dim 128; here
    # layer 0 chunked + RoPE + dense MLP, layer 1 full attention + NoPE + MoE (4 tiny experts, top-1, shared expert)
    tok = build_llama4_tokenizer()
    text = _text(tok, intermediate_size=32, intermediate_size_mlp=2 * WIDTH, num_local_experts=4,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=16,
                 rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})
    vision = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": LLAMA4_TILE, "patch_size": LLAMA4_PATCH, "pixel_shuffle_ratio": 0.5,
              "projector_input_dim": WIDTH, "projector_output_dim": WIDTH, "vision_output_dim": WIDTH,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}
    ids = tok.convert_tokens_to_ids(["<|image_start|>", "<|image_end|>", "<|patch|>"])
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids[0], eoi_token_index=ids[1],
                          image_token_index=ids[2])
    image = Llama4ImageProcessor(size=_image_size(LLAMA4_TILE), max_patches=1, resize_to_max_canvas=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Llama4Processor(image_processor=image, tokenizer=tok, patch_size=LLAMA4_PATCH,
                                pixel_shuffle_ratio=0.5, chat_template=tok.chat_template)
    return Llama4ForConditionalGeneration(config), processor


# ------------------------------------------------------------------------------------------------ LFM2-VL

LFM2_SPECIALS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool_call_start|>",
                 "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>")
LFM2_IMAGE = ("<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>")

# LiquidAI/LFM2-VL-450M style (ChatML): "<image>" per image (the processor expands it).
LFM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_lfm2_tokenizer() -> PreTrainedTokenizerFast:
    """LFM2-style tokenizer: ``<|pad|>``, ``<|startoftext|>``, ``<|endoftext|>`` and the ChatML and tool tokens first,
    BPE, the image tokens last; bos added on encode."""
    tok = bpe_with(LFM2_IMAGE, leading=LFM2_SPECIALS)
    bos_first(tok, "<|startoftext|>")
    named = {"<|pad|>", "<|startoftext|>", "<|im_end|>"}
    return fast(tok, bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
                extra_special_tokens=[t for t in (*LFM2_SPECIALS, *LFM2_IMAGE) if t not in named],
                chat_template=LFM2_CHAT_TEMPLATE)


LFM2_PATCH = 8  # 48 px images: 6x6 SigLIP2 patches, pixel-unshuffled (2) to 3x3 = 9 image tokens


def _build_lfm2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    # LiquidAI/LFM2-VL-450M: SigLIP2 NaFlex tower, LFM2-350M text model (16 layers: 10 gated short-convolution layers,
    # 6 GQA attention layers 16/8, head_dim 64 = 1024 / 16); here layer 0 convolution, layer 1 attention
    tok = build_lfm2_tokenizer()
    text = _text(tok, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False, conv_L_cache=3)
    del text["head_dim"]  # Lfm2Config has none: hidden_size / num_attention_heads
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_patches": 64, "patch_size": LFM2_PATCH, "vision_use_head": False}
    config = Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          projector_hidden_size=WIDTH, downsample_factor=2)
    image = Lfm2VlImageProcessor(encoder_patch_size=LFM2_PATCH, downsample_factor=2, do_image_splitting=False,
                                 min_image_tokens=4, max_image_tokens=16, max_num_patches=64, use_thumbnail=False)
    return Lfm2VlForConditionalGeneration(config), Lfm2VlProcessor(image, tok, chat_template=tok.chat_template)


ZOO_LLAMA_MISTRAL_LFM: dict[str, tuple[str, Builder]] = {
    "mllama": ("mllama", _build_mllama),
    "llama4": ("llama4", _build_llama4),
    "lfm2_vl": ("lfm2_vl", _build_lfm2_vl),
    "pixtral": ("pixtral", _build_pixtral),
    "mistral_small": ("mistral_small", _build_mistral_small),
}
