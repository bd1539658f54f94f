"""Tiny random-weight models of the Gemma image-text families (tests only): Gemma 3, Gemma 3n, Gemma 4 and PaliGemma
(Pixtral, Mistral Small 3, Llama 3.2 Vision, Llama 4 and LFM2-VL, and the parts all these builders share, are in
:mod:`llamafactory_hera_testing.zoo_llama_mistral_lfm`).

Each builder returns ``(model, processor)`` like the fixtures' builders (:mod:`llamafactory_hera.fixtures.models`, whose
tokenizer helpers they reuse): a width-64 text model with the family's layer mix, a width-32, 2-layer vision tower and a
512-token tokenizer carrying the special tokens of the family's LLaMA-Factory template and processor. Processor sizes
give a few image tokens per 48 px image of the tiny dataset. :data:`ZOO_GEMMA` maps the LLaMA-Factory family name to
(template name, builder); save one with ``save_built(builder, folder, seed, stream)``.
"""

from __future__ import annotations

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3nAudioFeatureExtractor,
    Gemma3nConfig,
    Gemma3nForConditionalGeneration,
    Gemma3nProcessor,
    Gemma3Processor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessor,
)

from llamafactory_hera.fixtures.newer import newer
from llamafactory_hera.fixtures.tokenizer import bos_first, bpe_with, fast
from llamafactory_hera_testing.zoo_llama_mistral_lfm import HEAD_DIM, WIDTH, Builder, _image_size, _text


def _siglip(image_size: int, patch: int) -> dict:
    """A tiny SigLIP vision tower: width 32, 2 layers, 2 heads."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": patch}


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

# classes only newer transformers releases have (the family's tests skip on an older one)
Gemma4AudioFeatureExtractor = newer("Gemma4AudioFeatureExtractor")
Gemma4Config = newer("Gemma4Config")
Gemma4ForConditionalGeneration = newer("Gemma4ForConditionalGeneration")
Gemma4ImageProcessor = newer("Gemma4ImageProcessor")
Gemma4Processor = newer("Gemma4Processor")
Gemma4VideoProcessor = newer("Gemma4VideoProcessor")


def build_gemma_tokenizer(named: dict[str, str], chat_template: str | None = None, extra: tuple[str, ...] = (),
                          turns: tuple[str, ...] = GEMMA_TURNS,
                          blocks: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Gemma-style tokenizer: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` at ids 0-3, BPE, the turn markers, ``extra``
    and the ``named`` tokens (tokenizer attributes, e.g. ``image_token``) last, or ``blocks`` last when given (which
    must hold the named tokens not in ``extra``); bos added on encode."""
    tail = blocks or tuple(named.values())
    tok = bpe_with((*turns, *extra, *tail), leading=GEMMA_LEADING)
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

# ------------------------------------------------------------------------------------------------ Gemma 3n

# Gemma 3n's vocabulary ends with a vision block (<end_of_image>, <image_soft_token>, ...) and an audio block: token
# ids in a block are embedded by that modality's embedder. Here 8 ids each, after 496 text ids.
GEMMA3N_BLOCK, GEMMA3N_TEXT_VOCAB = 8, 496
GEMMA3N_NAMED = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>", "eoi_token": "<end_of_image>",
                 "image_token": "<image_soft_token>", "eoa_token": "<end_of_audio>",
                 "audio_token": "<audio_soft_token>"}
GEMMA3N_SIDE, GEMMA3N_TOKENS = 64, 4  # 64 px images through a stride-32 ConvNeXt: 2x2 = 4 soft tokens
# LLaMA-Factory adds a silent clip padded to 30 s to every batch without audio: its 2,997 frames give 188 soft tokens
GEMMA3N_AUDIO_TOKENS = 188


def build_gemma3n_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma 3n-style tokenizer: the Gemma layout whose last 16 ids are the vision block (``<end_of_image>``,
    ``<image_soft_token>``, padding) and the audio block (``<end_of_audio>``, ``<audio_soft_token>``, padding)."""
    pads = [[f"<|{kind}_{i}|>" for i in range(GEMMA3N_BLOCK - 2)] for kind in ("vision", "audio")]
    blocks = ("<end_of_image>", "<image_soft_token>", *pads[0], "<end_of_audio>", "<audio_soft_token>", *pads[1])
    return build_gemma_tokenizer(GEMMA3N_NAMED, GEMMA3_CHAT_TEMPLATE, extra=("<start_of_image>", "<start_of_audio>"),
                                 blocks=blocks)


def _build_gemma3n() -> tuple[PreTrainedModel, ProcessorMixin]:
    # google/gemma-3n-E4B-it: MobileNetV5 vision tower, 35 layers (4 sliding-window layers per full-attention layer),
    # the last 15 layers reading earlier layers' keys and values (no k_proj / v_proj of their own), GQA 8/2,
    # head_dim 256, AltUp, LAuReL and per-layer inputs; here layers sliding, full, sliding reading layer 0's keys and
    # values, a tiny timm ConvNeXt (4 one-block stages, width 32) in place of MobileNetV5 (timm has no small one)
    tok = build_gemma3n_tokenizer()
    text = _text(tok, 3, layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16,
                 num_kv_shared_layers=1, vocab_size_per_layer_input=GEMMA3N_TEXT_VOCAB, hidden_size_per_layer_input=8,
                 laurel_rank=4)
    vision = {"architecture": "test_convnext", "model_args": {"depths": [1] * 4, "dims": [8, 16, 24, 32]},
              "hidden_size": 32, "vocab_size": GEMMA3N_BLOCK, "vocab_offset": GEMMA3N_TEXT_VOCAB}
    audio = {"hidden_size": 32, "conf_num_hidden_layers": 1, "conf_num_attention_heads": 2,
             "sscp_conv_channel_size": [8, 8], "vocab_size": GEMMA3N_BLOCK,
             "vocab_offset": GEMMA3N_TEXT_VOCAB + GEMMA3N_BLOCK}
    ids = {f"{key}_id": tok.convert_tokens_to_ids(token) for key, token in GEMMA3N_NAMED.items()}
    config = Gemma3nConfig(
        text_config=text, vision_config=vision, audio_config=audio, vision_soft_tokens_per_image=GEMMA3N_TOKENS,
        audio_soft_tokens_per_image=GEMMA3N_AUDIO_TOKENS, **ids,
    )
    image = SiglipImageProcessor(size=_image_size(GEMMA3N_SIDE), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=image,
                                 tokenizer=tok, chat_template=tok.chat_template, audio_seq_length=GEMMA3N_AUDIO_TOKENS,
                                 image_seq_length=GEMMA3N_TOKENS)
    return Gemma3nForConditionalGeneration(config), processor


# ------------------------------------------------------------------------------------------------ Gemma 4

GEMMA4_TURNS = ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>")
GEMMA4_IMAGE = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>"}

# google/gemma-4-e2b-it style: "<|image|>" per image (the processor expands it), "model" for the assistant.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Gemma 4's image processor keeps >= 70 soft tokens per image: a 48 px image is resized to 96 px, 24x24 patches of
# 4 px, pooled 3x3 to 8x8 = 64 image tokens (the fewest it allows)
GEMMA4_PATCH, GEMMA4_POOL, GEMMA4_SOFT_TOKENS = 4, 3, 70


def _build_gemma4() -> tuple[PreTrainedModel, ProcessorMixin]:
    # google/gemma-4-e2b-it: sliding-window layers with a full-attention layer between runs of them (the last layer
    # full), the last layers reading earlier layers' keys and values (num_kv_shared_layers: no k_proj / v_proj of
    # their own), head_dim 256 on sliding and global_head_dim 512 on full layers, per-layer input embeddings; here
    # layers sliding, full, full reading layer 1's keys and values, head_dim 16 (sliding) and 32 (full)
    tok = build_gemma_tokenizer(GEMMA4_IMAGE, GEMMA4_CHAT_TEMPLATE, extra=("<|video|>",), turns=GEMMA4_TURNS)
    text = _text(tok, 3, layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=16,
                 head_dim=16, global_head_dim=HEAD_DIM, num_kv_shared_layers=1, hidden_size_per_layer_input=8,
                 vocab_size_per_layer_input=len(tok))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "patch_size": GEMMA4_PATCH,
              "pooling_kernel_size": GEMMA4_POOL, "position_embedding_size": 32}
    config = Gemma4Config(text_config=text, vision_config=vision, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id, image_token_id=tok.image_token_id,
                          video_token_id=tok.convert_tokens_to_ids("<|video|>"))
    sizes = {"patch_size": GEMMA4_PATCH, "pooling_kernel_size": GEMMA4_POOL, "max_soft_tokens": GEMMA4_SOFT_TOKENS}
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**sizes), tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**sizes), chat_template=tok.chat_template,
        image_seq_length=GEMMA4_SOFT_TOKENS)
    return Gemma4ForConditionalGeneration(config), processor


ZOO_GEMMA: dict[str, tuple[str, Builder]] = {
    "gemma3": ("gemma3", _build_gemma3),
    "gemma3n": ("gemma3n", _build_gemma3n),
    "gemma4": ("gemma4", _build_gemma4),
    "paligemma": ("paligemma", _build_paligemma),
}
