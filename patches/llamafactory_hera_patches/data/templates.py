"""What each of LLaMA-Factory's chat templates needs of a tokenizer, which stages its parser accepts and which model
types it treats as multimodal, read (not patched) for the plugin's checks before any model loads.

Checked on LLaMA-Factory 0.9.5:
- ``llamafactory.data.template.TEMPLATES``: name -> ``Template`` with ``stop_words`` (``fix_special_tokens`` adds
  them to the tokenizer as special tokens when missing, the first replacing EOS when ``replace_eos``: a token the
  model's embeddings do not have), the formatters ``format_user`` / ``format_assistant`` / ``format_system`` /
  ``format_prefix`` whose ``slots`` hold the template's markup strings, and ``mm_plugin`` (``BasePlugin`` for a
  text-only template);
- ``llamafactory.hparams.FinetuningArguments.stage``: a ``Literal`` of the host's stages;
- ``llamafactory.model.model_utils.visual.COMPOSITE_MODELS``: model type -> its vision tower, projector and language
  model (the multimodal models LLaMA-Factory knows).
"""

from __future__ import annotations

import importlib
import re
import typing
from dataclasses import dataclass

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
    module = importlib.import_module("llamafactory.data.template")
    require(module, ("TEMPLATES",), "templates")
    out = {}
    for name, template in module.TEMPLATES.items():
        require(template, ("stop_words", "mm_plugin", *_FORMATS), "templates")
        markup = sorted({token for fmt in _FORMATS for slot in _slots(getattr(template, fmt))
                         for token in _MARKUP.findall(slot)})
        out[name] = TemplateTokens(name, tuple(template.stop_words or ()), tuple(markup),
                                   type(template.mm_plugin).__name__ != "BasePlugin",
                                   bool(getattr(template, "replace_eos", False)))
    return out


def host_stages() -> tuple[str, ...] | None:
    """The stages LLaMA-Factory's ``FinetuningArguments.stage`` accepts (None when it is not a ``Literal``)."""
    hparams = importlib.import_module("llamafactory.hparams")
    require(hparams, ("FinetuningArguments",), "stage")
    try:
        hint = typing.get_type_hints(hparams.FinetuningArguments).get("stage")
    except (NameError, TypeError):
        return None
    values = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    return tuple(str(v) for v in values) or None


def composite_model_types() -> set[str]:
    """Model types LLaMA-Factory treats as multimodal (vision tower, projector, language model)."""
    visual = importlib.import_module("llamafactory.model.model_utils.visual")
    require(visual, ("COMPOSITE_MODELS",), "templates")
    return set(visual.COMPOSITE_MODELS)


def image_placeholder() -> str:
    """The mark of an image's place in a message (``llamafactory.extras.constants.IMAGE_PLACEHOLDER``, ``<image>``
    unless the environment says otherwise): the multimodal templates' plugins require one per image of a row."""
    constants = importlib.import_module("llamafactory.extras.constants")
    require(constants, ("IMAGE_PLACEHOLDER",), "templates")
    return str(constants.IMAGE_PLACEHOLDER)
