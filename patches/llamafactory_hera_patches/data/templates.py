"""What each of LLaMA-Factory's chat templates needs of a tokenizer, which stages its parser accepts and which model
types it treats as multimodal, read (not patched) for the plugin's checks before any model loads; and what a template
does with a row's images (:func:`whole_row`: its image tokens and its length before ``cutoff_len``, for the refusal of a
``cutoff_len`` that cuts a row's image tokens, where Qwen3-VL's rope index would fail after the model loaded).

Checked on LLaMA-Factory 0.9.5: ``data.template.TEMPLATES`` (``stop_words``, the ``format_*`` formatters' ``slots``,
``mm_plugin``; ``fix_special_tokens`` adds missing stop words as new tokens, the first replacing EOS with
``replace_eos``), ``FinetuningArguments.stage`` (a ``Literal``), ``model_utils.visual.COMPOSITE_MODELS``,
``extras.constants`` (``IMAGE_PLACEHOLDER``, ``IGNORE_INDEX``) and, as ``data/processor/supervised.py`` calls them,
the plugin's ``process_messages`` / ``process_token_ids`` and ``image_token``, ``template.encode_multiturn`` and
``template.efficient_eos``.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

from ..guard import require

_MARKUP = re.compile(r"<\|[^|<>\s]+\|>")  # <|im_start|>, <|eot_id|>: special tokens of the template's model family
_FORMATS = ("format_user", "format_assistant", "format_system", "format_prefix")


@dataclass(frozen=True)
class TemplateTokens:
    """A template's tokens that must be single tokens of the model's vocabulary."""

    name: str
    stop_words: tuple[str, ...]  # added to the tokenizer (new ids, outside the embeddings) when missing
    markup: tuple[str, ...]  # ``<|...|>`` strings of its formats: split into pieces when missing
    multimodal: bool  # the template has a multimodal plugin
    replace_eos: bool = False  # the first stop word becomes EOS, which ends every training sequence

    @property
    def needed(self) -> set[str]:
        """The markup, and the first stop word when it replaces EOS. The other stop words only stop generation: a
        tokenizer without them (Llama-3.0 lacks ``<|eom_id|>`` of the ``llama3`` template) never meets them in
        inputs, so they are not needed."""
        return set(self.markup) | ({self.stop_words[0]} if self.replace_eos and self.stop_words else set())


def _slots(formatter: object) -> list[str]:
    return [slot for slot in getattr(formatter, "slots", None) or [] if isinstance(slot, str)]


def template_tokens() -> dict[str, TemplateTokens]:
    """Every registered template's tokens (name -> :class:`TemplateTokens`)."""
    import llamafactory.data.template as module  # lazy (the package doc)

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
    """The stages LLaMA-Factory's ``FinetuningArguments.stage`` accepts (None when it is not a ``Literal``)."""
    import llamafactory.hparams as hparams  # lazy (the package doc)

    require(hparams, ("FinetuningArguments",), "stage")
    try:
        hint = typing.get_type_hints(hparams.FinetuningArguments).get("stage")
    except (NameError, TypeError):
        return None
    values = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    return tuple(str(v) for v in values) or None


def composite_model_types() -> set[str]:
    """Model types LLaMA-Factory treats as multimodal (vision tower, projector, language model)."""
    import llamafactory.model.model_utils.visual as visual  # lazy (the package doc)

    require(visual, ("COMPOSITE_MODELS",), "templates")
    return set(visual.COMPOSITE_MODELS)


def image_placeholder() -> str:
    """The mark of an image's place in a message (``llamafactory.extras.constants.IMAGE_PLACEHOLDER``, ``<image>``
    unless the environment says otherwise): the multimodal templates' plugins require one per image of a row."""
    import llamafactory.extras.constants as constants  # lazy (the package doc)

    require(constants, ("IMAGE_PLACEHOLDER",), "templates")
    return str(constants.IMAGE_PLACEHOLDER)


def ignore_index() -> int:
    """The label of a token that is not trained (``IGNORE_INDEX``, -100)."""
    import llamafactory.extras.constants as constants  # lazy (the package doc)

    require(constants, ("IGNORE_INDEX",), "image tokens")
    return int(constants.IGNORE_INDEX)


def image_token_id(template: Any, tokenizer: Any) -> int | None:
    """The id of the token the template's plugin repeats for an image's features; None for a text-only template."""
    token = getattr(getattr(template, "mm_plugin", None), "image_token", None)
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def whole_row(template: Any, tokenizer: Any, processor: Any, aligned: dict[str, Any]) -> tuple[int, int]:
    """(image tokens of the aligned row's images, the row's length in tokens before ``cutoff_len``), as the
    supervised preprocessing expands and encodes it (its images decoded and processed once more)."""
    plugin = template.mm_plugin
    images, videos, audios = (aligned.get(key) or [] for key in ("_images", "_videos", "_audios"))
    messages = plugin.process_messages(aligned["_prompt"] + aligned["_response"], images, videos, audios, processor)
    image_tokens = sum(str(message["content"]).count(plugin.image_token) for message in messages)
    prefix, _ = plugin.process_token_ids([], [], images, videos, audios, tokenizer, processor)
    pairs = template.encode_multiturn(tokenizer, messages, aligned.get("_system"), aligned.get("_tools"))
    length = len(prefix) + (1 if template.efficient_eos else 0) + sum(len(s) + len(t) for s, t in pairs)
    return image_tokens, length
