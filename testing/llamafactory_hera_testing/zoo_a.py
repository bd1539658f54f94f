"""Tiny random-weight models of more image-text families (tests only): Gemma 3, PaliGemma, Pixtral, Mistral Small 3,
Llama 3.2 Vision (mllama), Llama 4, LFM2-VL, Gemma 3n and Gemma 4.

Each builder returns ``(model, processor)`` like the fixtures' builders (:mod:`llamafactory_hera.fixtures.models`,
whose tokenizer helpers and shared parts they reuse): a width-64 text model with the family's layer mix, a width-32,
2-layer vision tower and a ~500-token tokenizer carrying the special tokens of the family's LLaMA-Factory template and
processor. Processor sizes give a few image tokens per 48 px image of the tiny dataset. :data:`ZOO_A` maps the
LLaMA-Factory family name to (template name, builder); save one with ``save_built(builder, folder, seed, stream)``.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessor,
)

from llamafactory_hera.fixtures.tokenizer import bos_first, bpe_with, fast

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


def _siglip(image_size: int, patch: int) -> dict:
    """A tiny SigLIP vision tower: width 32, 2 layers, 2 heads."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": patch}


def _image_size(side: int) -> dict:
    return {"height": side, "width": side}


# ------------------------------------------------------------------------------------------------ Gemma 3, PaliGemma

GEMMA_LEADING = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3, as in Gemma's vocabulary
GEMMA_TURNS = ("<start_of_turn>", "<end_of_turn>")
GEMMA3_IMAGE = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

# google/gemma-3-4b-it style: "<start_of_image>" per image (the processor expands it), "model" for the assistant.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma_tokenizer(named: dict[str, str], chat_template: str | None = None,
                          extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Gemma-style tokenizer: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` at ids 0-3, BPE, the turn markers, ``extra``
    and the ``named`` tokens (tokenizer attributes, e.g. ``image_token``) last; bos added on encode."""
    tok = bpe_with((*GEMMA_TURNS, *extra, *named.values()), leading=GEMMA_LEADING)
    bos_first(tok, "<bos>")
    return fast(tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                extra_special_tokens=dict(named), chat_template=chat_template)


GEMMA3_IMAGE_SIZE, GEMMA3_PATCH, GEMMA3_TOKENS = 32, 8, 4  # 4x4 patches pooled to 2x2 = 4 soft tokens per image


def _build_gemma3() -> tuple[PreTrainedModel, ProcessorMixin]:
    # google/gemma-3-4b-it: 34 layers, 5 sliding-window (local) layers per full-attention layer, GQA 8/4, head_dim 256
    tok = build_gemma_tokenizer(GEMMA3_IMAGE, GEMMA3_CHAT_TEMPLATE)
    text = _text(tok, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                 query_pre_attn_scalar=HEAD_DIM, rope_parameters={
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    config = Gemma3Config(
        text_config=text, vision_config=_siglip(GEMMA3_IMAGE_SIZE, GEMMA3_PATCH), mm_tokens_per_image=GEMMA3_TOKENS,
        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id,
    )
    model = Gemma3ForConditionalGeneration(config)
    image = Gemma3ImageProcessor(size=_image_size(GEMMA3_IMAGE_SIZE), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Gemma3Processor(image_processor=image, tokenizer=tok, chat_template=tok.chat_template,
                                  image_seq_length=GEMMA3_TOKENS)


PALIGEMMA_IMAGE_SIZE, PALIGEMMA_PATCH = 32, 8  # 4x4 = 16 image tokens, prepended to the prompt


def _build_paligemma() -> tuple[PreTrainedModel, ProcessorMixin]:
    # google/paligemma-3b-pt-224: SigLIP-So400m + Gemma-2B (18 layers, multi-query attention 8/1, head_dim 256)
    tok = build_gemma_tokenizer({"image_token": "<image>"})
    tokens = (PALIGEMMA_IMAGE_SIZE // PALIGEMMA_PATCH) ** 2
    image = SiglipImageProcessor(size=_image_size(PALIGEMMA_IMAGE_SIZE), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image.image_seq_length = tokens
    processor = PaliGemmaProcessor(image_processor=image, tokenizer=tok)  # adds the <loc>/<seg> tokens
    text = _text(tok, num_key_value_heads=1, model_type="gemma", vocab_size=len(processor.tokenizer))
    config = PaliGemmaConfig(
        text_config=text, vision_config=_siglip(PALIGEMMA_IMAGE_SIZE, PALIGEMMA_PATCH) | {"projection_dim": WIDTH},
        image_token_index=tok.image_token_id, projection_dim=WIDTH, hidden_size=WIDTH,
    )
    return PaliGemmaForConditionalGeneration(config), processor


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


ZOO_A: dict[str, tuple[str, Builder]] = {
    "gemma3": ("gemma3", _build_gemma3),
    "paligemma": ("paligemma", _build_paligemma),
    "pixtral": ("pixtral", _build_pixtral),
    "mistral_small": ("mistral_small", _build_mistral_small),
}
