"""Models used beside the trained one (the frozen teacher, the ``hera_heads: auto`` scoring copy) load whole on every
rank (:func:`loaded_whole`): outside the DeepSpeed or FSDP engine, partitioned ones would be placeholders, and FSDP's
efficient loading gives zeros off local rank 0. :func:`zero3_forward` gathers, outside the engine's forward,
parameters a module reads from another.

Checked on transformers 5.6 (``_hf_deepspeed_config_weak_ref``, which ``from_pretrained`` consults to load inside
``zero.Init``; ``FSDP_CPU_RAM_EFFICIENT_LOADING``, read by ``is_fsdp_enabled``) with DeepSpeed 0.19.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

from torch import nn

from ..guard import HostMismatchError

EFFICIENT_LOADING = "FSDP_CPU_RAM_EFFICIENT_LOADING"


@contextlib.contextmanager
def loaded_whole() -> Iterator[None]:
    """Models load whole in this block: outside ``zero.Init`` under ZeRO-3, and with FSDP's efficient loading off (it
    zero-fills parameters off local rank 0, expecting FSDP's broadcast)."""
    integration = importlib.import_module("transformers.integrations.deepspeed")
    if not hasattr(integration, "_hf_deepspeed_config_weak_ref"):
        raise HostMismatchError(
            "llamafactory-hera: transformers.integrations.deepspeed has no "
            "_hf_deepspeed_config_weak_ref (checked on transformers 5.6); cannot load the "
            "teacher outside ZeRO-3 partitioning. Use DeepSpeed ZeRO-2 or upgrade the plugin."
        )
    saved = integration._hf_deepspeed_config_weak_ref
    efficient = os.environ.pop(EFFICIENT_LOADING, None)
    integration._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        integration._hf_deepspeed_config_weak_ref = saved
        if efficient is not None:
            os.environ[EFFICIENT_LOADING] = efficient


@contextlib.contextmanager
def zero3_forward(model: nn.Module) -> Iterator[None]:
    """A forward outside the engine's (HeRA's alignment monitor), flagged as the engine flags its own: under ZeRO-3 a
    parameter read from another module (PEFT's DoRA reads ``lora_A``'s) is then gathered, not an empty placeholder."""
    flagged = [module._parameters for module in model.modules() if hasattr(module._parameters, "_in_forward")]
    if not flagged and any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        raise HostMismatchError(
            "llamafactory-hera: this DeepSpeed's ZeRO-3 modules have no _in_forward flag "
            "(checked on DeepSpeed 0.19), which HeRA's alignment monitor sets for its forward "
            "outside the engine's; set hera_monitor_steps: 0 or use the DeepSpeed the plugin was "
            "tested with."
        )
    before = [parameters._in_forward for parameters in flagged]
    for parameters in flagged:
        parameters._in_forward = True
    try:
        yield
    finally:
        for parameters, value in zip(flagged, before, strict=True):
            parameters._in_forward = value
