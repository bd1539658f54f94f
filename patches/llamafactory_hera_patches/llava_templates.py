"""LLaVA-1.5 chat templates for the LLM families ``llamafactory-hera compose`` builds models from.

Each is the family's own conversation format, LLaMA-Factory's template for it copied whole (formats, stop words,
``replace_eos``, template class), with LLaVA-1.5's image plugin (``get_mm_plugin(name="llava",
image_token="<image>")``), which expands each ``<image>`` to the processor's image sequence length. Vicuna's
(``llava_vicuna``) is LLaMA-Factory's ``vicuna`` format with the BOS LLaVA-1.5 tokenizes every row with
(``conv_vicuna_v1``: ``<s>SYSTEM USER: ... ASSISTANT: answer</s>``), which LLaMA-Factory's ``vicuna`` / ``llava``
templates leave out: it is the attention sink the first layers' heads see in every row (the paper's Vicuna-7B heads
are all in L0-L1). The spaces LLaVA writes between system, user and answer come from the tokenizer: LLaMA-Factory
encodes each part on its own, and Llama's SentencePiece adds the leading ``▁`` to each. Registered when
``llamafactory.data.template`` is imported (the start-up hook), so ``llamafactory-cli train`` / ``chat`` / ``export``
and LlamaBoard list them.

Checked on LLaMA-Factory 0.9.5: ``llamafactory.data.template.TEMPLATES`` maps a name to a ``Template`` dataclass;
``llamafactory.data.mm_plugin.get_mm_plugin(name, image_token=...)``.
Imported by the plugin for :data:`FAMILY_TEMPLATES` alone: nothing of LLaMA-Factory is imported before :func:`apply`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from .guard import HostMismatchError, host_version, require

IMAGE_TOKEN = "<image>"
# LLM family -> (the template a composed model trains with, LLaMA-Factory's template whose conversation format it has)
FAMILY_TEMPLATES: dict[str, tuple[str, str]] = {
    "qwen2.5": ("llava_qwen2_5", "qwen"),
    "qwen3": ("llava_qwen3", "qwen3_nothink"),  # LLaVA's data has no <think> blocks: the format without them
    "vicuna": ("llava_vicuna", "vicuna"),  # with the BOS LLaVA-1.5 starts each row with
    "llama2": ("llava_llama2", "llama2"),
    "llama3": ("llava_llama3", "llama3"),
}


def apply(module: ModuleType) -> None:
    """Register the templates of :data:`FAMILY_TEMPLATES` in ``llamafactory.data.template`` (a name the host already
    has is left as it is)."""
    require(module, ("TEMPLATES",), "llava_templates")
    mm_plugin = importlib.import_module("llamafactory.data.mm_plugin")
    require(mm_plugin, ("get_mm_plugin",), "llava_templates")
    missing = [base for _, base in FAMILY_TEMPLATES.values() if base not in module.TEMPLATES]
    if missing:
        raise HostMismatchError(f"llamafactory-hera: LLaMA-Factory {host_version()} has no template "
                                f"{', '.join(missing)}, whose conversation formats the LLaVA templates copy.")
    formatter = importlib.import_module("llamafactory.data.formatter")
    require(formatter, ("EmptyFormatter",), "llava_templates")
    for name, base in FAMILY_TEMPLATES.values():
        if name in module.TEMPLATES:
            continue
        plugin = mm_plugin.get_mm_plugin(name="llava", image_token=IMAGE_TOKEN)
        changes = {"mm_plugin": plugin}
        if name == "llava_vicuna":  # LLaVA-1.5's conv_vicuna_v1 starts every row with "<s>"
            changes["format_prefix"] = formatter.EmptyFormatter(slots=[{"bos_token"}])
        module.TEMPLATES[name] = dataclasses.replace(module.TEMPLATES[base], **changes)
