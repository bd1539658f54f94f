"""DeepSpeed ZeRO-3 adaptations: models that must not be partitioned are loaded outside ``zero.Init``.

Checked on transformers 5.6 (``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref``,
the module global that ``from_pretrained`` consults to decide whether to load inside ``zero.Init``)
with DeepSpeed 0.19. The frozen teacher and the scoring copy of ``hera_heads: auto`` are used
outside the DeepSpeed engine, so partitioning them would leave placeholder weights.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from .guard import HostMismatchError


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load models inside this block as ordinary (unpartitioned) modules, even under a ZeRO-3 config."""
    integration = importlib.import_module("transformers.integrations.deepspeed")
    if not hasattr(integration, "_hf_deepspeed_config_weak_ref"):
        raise HostMismatchError("llamafactory-hera: transformers.integrations.deepspeed has no "
                                "_hf_deepspeed_config_weak_ref (checked on transformers 5.6); cannot load the "
                                "teacher outside ZeRO-3 partitioning. Use DeepSpeed ZeRO-2 or upgrade the plugin.")
    saved = integration._hf_deepspeed_config_weak_ref
    integration._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        integration._hf_deepspeed_config_weak_ref = saved
