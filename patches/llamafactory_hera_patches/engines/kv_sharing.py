"""One line for stock stages on a KV-sharing model (Gemma 4; any ``num_kv_shared_layers``) under reentrant gradient
checkpointing: that gradient is dropped, and how to keep it.

Checked on LLaMA-Factory 0.9.5 with transformers 5.6: a KV-shared layer reads its source's keys and values from
``shared_kv_states``, outside its checkpointed call; the host defaults to reentrant except for ``gemma3n``. Why:
docs/hera-design.md ("Gradient checkpointing"). The stage keeps the host's behaviour and says so.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from llamafactory_hera.runtime.log import line

NOTE = (
    "reentrant gradient checkpointing (use_reentrant_gc: true, LLaMA-Factory's default) drops the gradient that "
    "flows through shared keys and values on this model"
)


def reentrant_kv_note(model_args: Any, training_args: Any) -> str | None:
    """The line for a training run that shares keys and values and checkpoints reentrantly, else None."""
    if (
        not getattr(training_args, "do_train", False)
        or getattr(model_args, "disable_gradient_checkpointing", True)
        or not getattr(model_args, "use_reentrant_gc", False)
        or getattr(model_args, "use_unsloth_gc", False)
    ):
        return None
    try:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=bool(getattr(model_args, "trust_remote_code", False))
        )
    except (OSError, ValueError):
        return None
    kind = str(getattr(config, "model_type", ""))
    text = config.get_text_config()
    shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
    total = int(getattr(text, "num_hidden_layers", 0) or 0)
    if kind == "gemma3n" or not 0 < shared < total:  # the host turns checkpointing off for gemma3n
        return None
    return line(
        f"{NOTE} ({kind}: the last {shared} of {total} decoder layers read earlier layers' "
        "keys and values); set use_reentrant_gc: false to train it."
    )
