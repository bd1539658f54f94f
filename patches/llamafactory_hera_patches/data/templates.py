"""Host facts read (not patched) for checks before any model loads: what each chat template needs of a tokenizer,
the parser's stages, the multimodal model types; and a row's image tokens and length before ``cutoff_len``
(:func:`whole_row`), to refuse a ``cutoff_len`` cutting image tokens (Qwen3-VL's rope index would fail after loading).

Checked on LLaMA-Factory 0.9.5: ``TEMPLATES`` (``fix_special_tokens`` adds missing stop words as new tokens, the
first replacing EOS with ``replace_eos``), ``FinetuningArguments.stage`` (a ``Literal``), ``COMPOSITE_MODELS``,
``extras.constants``, and the plugin and template methods as ``data/processor/supervised.py`` calls them.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

from ..guard import require

_MARKUP = re.compile(r"<\|[^|<>\s]+\|>")  # <|im_start|>, <|eot_id|>, ...
_FORMATS = ("format_user", "format_assistant", "format_system", "format_prefix")


@dataclass(frozen=True)
class TemplateTokens:
    """A template's tokens that must be single tokens of the vocabulary."""

    name: str
    stop_words: tuple[str, ...]  # added as new ids (outside the embeddings) when missing
    markup: tuple[str, ...]  # ``<|...|>`` of its formats: split when missing
    multimodal: bool  # has a multimodal plugin
    replace_eos: bool = False  # the first stop word becomes EOS, ending every training sequence

    @property
    def needed(self) -> set[str]:
        """The markup, and the first stop word if it replaces EOS. Other stop words only stop generation, never met in
        inputs (Llama-3.0 lacks ``<|eom_id|>`` of the ``llama3`` template)."""
        return set(self.markup) | ({self.stop_words[0]} if self.replace_eos and self.stop_words else set())


def _slots(formatter: object) -> list[str]:
    return [slot for slot in getattr(formatter, "slots", None) or [] if isinstance(slot, str)]


def template_tokens() -> dict[str, TemplateTokens]:
    """Every registered template's tokens, by name."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.data.template as module

    require(module, ("TEMPLATES",), "templates")
    out = {}
    for name, template in module.TEMPLATES.items():
        require(template, ("stop_words", "mm_plugin", *_FORMATS), "templates")
        markup = sorted(
            {token for fmt in _FORMATS for slot in _slots(getattr(template, fmt)) for token in _MARKUP.findall(slot)}
        )
        out[name] = TemplateTokens(
            name,
            tuple(template.stop_words or ()),
            tuple(markup),
            type(template.mm_plugin).__name__ != "BasePlugin",
            bool(getattr(template, "replace_eos", False)),
        )
    return out


def host_stages() -> tuple[str, ...] | None:
    """The stages ``FinetuningArguments.stage`` accepts (None if not a ``Literal``)."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.hparams as hparams

    require(hparams, ("FinetuningArguments",), "stage")
    try:
        hint = typing.get_type_hints(hparams.FinetuningArguments).get("stage")
    except (NameError, TypeError):
        return None
    values = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    return tuple(str(v) for v in values) or None


def composite_model_types() -> set[str]:
    """Model types the host treats as multimodal (vision tower, projector, language model)."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.model.model_utils.visual as visual

    require(visual, ("COMPOSITE_MODELS",), "templates")
    return set(visual.COMPOSITE_MODELS)


def image_placeholder() -> str:
    """``IMAGE_PLACEHOLDER`` (``<image>`` unless the environment says otherwise): multimodal plugins require one per
    image of a row."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.extras.constants as constants

    require(constants, ("IMAGE_PLACEHOLDER",), "templates")
    return str(constants.IMAGE_PLACEHOLDER)


def ignore_index() -> int:
    """An untrained token's label (``IGNORE_INDEX``, -100)."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.extras.constants as constants

    require(constants, ("IGNORE_INDEX",), "image tokens")
    return int(constants.IGNORE_INDEX)


def image_token_id(template: Any, tokenizer: Any) -> int | None:
    """Id of the token the plugin repeats for an image's features; None for a text-only template."""
    token = getattr(getattr(template, "mm_plugin", None), "image_token", None)
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def whole_row(template: Any, tokenizer: Any, processor: Any, aligned: dict[str, Any]) -> tuple[int, int]:
    """(image tokens of the aligned row, its length before ``cutoff_len``) as supervised preprocessing encodes it
    (images decoded and processed again)."""
    plugin = template.mm_plugin
    images, videos, audios = (aligned.get(key) or [] for key in ("_images", "_videos", "_audios"))
    messages = plugin.process_messages(aligned["_prompt"] + aligned["_response"], images, videos, audios, processor)
    image_tokens = sum(str(message["content"]).count(plugin.image_token) for message in messages)
    prefix, _ = plugin.process_token_ids([], [], images, videos, audios, tokenizer, processor)
    pairs = template.encode_multiturn(tokenizer, messages, aligned.get("_system"), aligned.get("_tools"))
    length = len(prefix) + (1 if template.efficient_eos else 0) + sum(len(s) + len(t) for s, t in pairs)
    return image_tokens, length
