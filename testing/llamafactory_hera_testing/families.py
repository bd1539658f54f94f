"""Tiny random-weight models of the families the shipped recipes name beyond the demo's three (tests only).

LLaVA-NeXT with a Llama-3-style text model, InternVL with a Qwen2 text model (as InternVL3) and with a Qwen3 text
model (as InternVL3.5), each saved with its tokenizer and processor like the fixtures' models
(:mod:`llamafactory_hera.fixtures.models`, whose shared parts they reuse). :func:`build_extra_families` builds them
once under a root folder; the recipe tests train on them and RAH-LoRA's model tests calibrate them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, processors
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llamafactory_hera.fixtures.models import (
    BUILDERS,
    FamilySpec,
    _clip_image_kwargs,
    _llava_config_kwargs,
    _llava_processor_kwargs,
    _text_kwargs,
    save_built,
)
from llamafactory_hera.fixtures.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    QWEN_ADDED_TOKENS,
    QWEN_SPECIAL_TOKENS,
    VOCAB_SIZE,
    _pad_vocab,
    train_bpe,
)

EXTRA_FAMILIES: dict[str, FamilySpec] = {
    # LLaVA-NeXT with a Llama-3-style GQA text model; anyres: 2x2 base + 4x4 grid + 4 newline tokens.
    "llava_next": FamilySpec("llava_next_llama3", 2, 64, 4, 2, 16, 24),
    # InternVL (model_type internvl) with a Qwen2 text model, as InternVL3 (Qwen2.5 LLMs).
    "internvl": FamilySpec("intern_vl", 2, 64, 4, 2, 16, 4),
    # InternVL with a Qwen3 text model (explicit head_dim, q/k norms), as InternVL3.5 (Qwen3 LLMs).
    "internvl_qwen3": FamilySpec("intern_vl", 2, 64, 4, 2, 32, 4),
}
EXTRA_MODEL_NAMES: tuple[str, ...] = tuple(EXTRA_FAMILIES)
STAMP_NAME = "extra_families_stamp.json"
VERSION = 1  # bump whenever the built models change

# InternVL (-hf conversions): a Qwen2/Qwen3 tokenizer plus the image wrapper tokens that InternVLProcessor
# reads as named tokenizer attributes (start/end/context image token, video token).
INTERNVL_NAMED_TOKENS: dict[str, str] = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# InternVL-hf style: ChatML with "<IMG_CONTEXT>" / "<video>" placeholders (the processor expands them).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llama3-llava-next-8b-hf appends these two after the Llama-3 vocabulary.
LLAMA3_LLAVA_TRAILING: tuple[str, ...] = ("<image>", "<pad>")

# llava-hf LLaVA-NeXT (Llama-3) style chat template with an "<image>" placeholder per image.
LLAMA3_LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """InternVL-style tokenizer: the Qwen layout plus ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>`` (named)."""
    named = tuple(INTERNVL_NAMED_TOKENS.values())
    n_trailing = len(QWEN_SPECIAL_TOKENS) + len(QWEN_ADDED_TOKENS) + len(named)
    tok = train_bpe(VOCAB_SIZE - n_trailing)
    _pad_vocab(tok, VOCAB_SIZE, n_trailing)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(INTERNVL_NAMED_TOKENS),
        chat_template=INTERNVL_CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_llama3_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3 / LLaVA-NeXT-style tokenizer: BPE, the Llama-3 specials, then ``<image>`` and ``<pad>``; bos added."""
    n_trailing = len(LLAMA3_SPECIAL_TOKENS) + len(LLAMA3_LLAVA_TRAILING)
    tok = train_bpe(VOCAB_SIZE - n_trailing)
    _pad_vocab(tok, VOCAB_SIZE, n_trailing)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_LLAVA_TRAILING])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        extra_special_tokens=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<image>"],
        chat_template=LLAMA3_LLAVA_CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# LLaVA-NeXT: anyres tiling over these canvases (tiles of LLAVA_IMAGE_SIZE); the real model uses 336 px tiles.
LLAVA_NEXT_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
# InternVL: 28 px tiles of 7 px patches -> 4x4 patches, pixel-shuffled (0.5) to 2x2 = 4 tokens per tile.
INTERNVL_IMAGE_SIZE, INTERNVL_PATCH = 28, 7


def _build_llava_next() -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = EXTRA_FAMILIES["llava_next"]
    tok = build_llama3_llava_tokenizer()
    text = LlamaConfig(**_text_kwargs(spec, tok), bos_token_id=tok.bos_token_id, rope_theta=500_000.0)
    config = LlavaNextConfig(text_config=text, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **_llava_config_kwargs(tok))
    model = LlavaNextForConditionalGeneration(config)
    image = LlavaNextImageProcessor(**_clip_image_kwargs(), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    return model, LlavaNextProcessor(image_processor=image, **_llava_processor_kwargs(tok))


def _build_internvl(name: str, text_model_type: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    spec = EXTRA_FAMILIES[name]
    tok = build_internvl_tokenizer()
    text = _text_kwargs(spec, tok) | {"model_type": text_model_type, "rope_theta": 1_000_000.0}
    if text_model_type == "qwen3":
        text["head_dim"] = spec.head_dim
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": INTERNVL_IMAGE_SIZE,
        "patch_size": INTERNVL_PATCH,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
    }
    num_tokens = (INTERNVL_IMAGE_SIZE // INTERNVL_PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=num_tokens,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    size = {"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE}
    image = GotOcr2ImageProcessor(
        size=dict(size), crop_to_patches=False, min_patches=1, max_patches=12,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )
    video = InternVLVideoProcessor(size=dict(size), image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    proc = InternVLProcessor(
        image_processor=image, tokenizer=tok, video_processor=video, image_seq_length=num_tokens,
        chat_template=tok.chat_template,
    )
    return model, proc


EXTRA_BUILDERS: dict[str, Callable[[], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "llava_next": _build_llava_next,
    "internvl": lambda: _build_internvl("internvl", "qwen2"),
    "internvl_qwen3": lambda: _build_internvl("internvl_qwen3", "qwen3"),
}


def build_extra_model(name: str, out_dir: Path, seed: int) -> Path:
    """Build family ``name`` with weights drawn under ``seed`` and save it (model + processor) to ``out_dir``."""
    # one RNG stream per family, after the fixtures' three
    return save_built(EXTRA_BUILDERS[name], out_dir, seed, len(BUILDERS) + list(EXTRA_BUILDERS).index(name))


@dataclass(frozen=True)
class ExtraFamilies:
    """The built models: family name -> model folder, and -> LLaMA-Factory template name."""

    models: dict[str, Path]
    templates: dict[str, str]


def _stamp(seed: int) -> dict:
    import transformers

    return {"version": VERSION, "seed": seed, "transformers_version": transformers.__version__}


def _built(root: Path, seed: int) -> bool:
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8")) == _stamp(seed)
    except (OSError, ValueError):
        return False


def build_extra_families(root: str | Path, seed: int = 0) -> ExtraFamilies:
    """Build (or reuse) every family of :data:`EXTRA_FAMILIES` under ``root``; built in a temporary sibling folder and
    renamed into place, so that test processes building at once (pytest-xdist workers) never read a partial build."""
    root = Path(root).resolve()
    if not _built(root, seed):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            for name in EXTRA_FAMILIES:
                build_extra_model(name, tmp / name, seed)
            (tmp / STAMP_NAME).write_text(json.dumps(_stamp(seed)), encoding="utf-8")
            if not _built(root, seed):  # else a concurrent builder finished first: keep its build
                if root.exists():  # a stale build: moved aside first
                    os.replace(root, tmp.with_name(tmp.name + "-stale"))
                try:
                    os.replace(tmp, root)
                except OSError:
                    if not _built(root, seed):  # not a concurrent builder's finished build
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp.with_name(tmp.name + "-stale"), ignore_errors=True)
    return ExtraFamilies(models={name: root / name for name in EXTRA_FAMILIES},
                         templates={name: spec.template for name, spec in EXTRA_FAMILIES.items()})
