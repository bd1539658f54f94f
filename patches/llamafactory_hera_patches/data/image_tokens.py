"""How many tokens a row's images take in LLaMA-Factory's supervised preprocessing, and how long the row is before
``cutoff_len`` truncates it: for the refusal of a ``cutoff_len`` that cuts a row's image tokens (the model's image
features would then outnumber the image tokens, and Qwen3-VL's rope index fails with a ``shape mismatch`` after the
model loaded).

Checked on LLaMA-Factory 0.9.5 (``data/processor/supervised.py``, ``_encode_data_example``): ``template.mm_plugin``
has ``image_token``, ``process_messages(messages, images, videos, audios, processor)`` (each ``<image>`` expanded into
the image's tokens) and ``process_token_ids(input_ids, labels, images, videos, audios, tokenizer, processor)``;
``template.encode_multiturn(tokenizer, messages, system, tools)`` gives the (source, target) ids of each turn before
truncation; ``template.efficient_eos``; ``llamafactory.extras.constants.IGNORE_INDEX`` marks untrained labels.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..guard import require


def ignore_index() -> int:
    """The label of a token that is not trained (``IGNORE_INDEX``, -100)."""
    constants = importlib.import_module("llamafactory.extras.constants")
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
