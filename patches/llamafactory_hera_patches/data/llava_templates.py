"""LLaVA-1.5 chat templates for the LLM families ``llamafactory-hera compose`` builds from: the host's template for
the family with LLaVA-1.5's image plugin. ``llava_vicuna`` adds the BOS LLaVA-1.5 starts rows with, which the host's
``vicuna`` / ``llava`` leave out: the first layers' heads use it as attention sink. Registered when
``llamafactory.data.template`` is imported, so ``llamafactory-cli`` and LlamaBoard list them.

Checked on LLaMA-Factory 0.9.5 (``TEMPLATES``, ``get_mm_plugin``). The plugin imports this module for
:data:`FAMILY_TEMPLATES` alone: nothing of the host is imported before :func:`apply`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import NamedTuple

from ..guard import HostMismatchError, host_version, require

IMAGE_TOKEN = "<image>"


class LlavaTemplate(NamedTuple):
    """A family's LLaVA-1.5 template: ``base``, the host template it copies; ``bos_first``: rows start with BOS."""

    name: str
    base: str
    bos_first: bool = False


# LLM family -> the template a composed model trains with
FAMILY_TEMPLATES: dict[str, LlavaTemplate] = {
    "qwen2.5": LlavaTemplate("llava_qwen2_5", "qwen"),
    "qwen3": LlavaTemplate("llava_qwen3", "qwen3_nothink"),  # LLaVA data has no <think> blocks
    "vicuna": LlavaTemplate("llava_vicuna", "vicuna", bos_first=True),
    "llama2": LlavaTemplate("llava_llama2", "llama2"),
    "llama3": LlavaTemplate("llava_llama3", "llama3"),
}


def apply(module: ModuleType) -> None:
    """Register :data:`FAMILY_TEMPLATES` (a name the host has is left as it is)."""
    require(module, ("TEMPLATES",), "llava_templates")
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.data.mm_plugin as mm_plugin

    require(mm_plugin, ("get_mm_plugin",), "llava_templates")
    missing = [template.base for template in FAMILY_TEMPLATES.values() if template.base not in module.TEMPLATES]
    if missing:
        raise HostMismatchError(
            f"llamafactory-hera: LLaMA-Factory {host_version()} has no template "
            f"{', '.join(missing)}, whose conversation formats the LLaVA templates copy."
        )
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.data.formatter as formatter

    require(formatter, ("EmptyFormatter",), "llava_templates")
    for name, base, bos_first in FAMILY_TEMPLATES.values():
        if name in module.TEMPLATES:
            continue
        changes = {"mm_plugin": mm_plugin.get_mm_plugin(name="llava", image_token=IMAGE_TOKEN)}
        if bos_first:
            changes["format_prefix"] = formatter.EmptyFormatter(slots=[{"bos_token"}])
        module.TEMPLATES[name] = dataclasses.replace(module.TEMPLATES[base], **changes)
