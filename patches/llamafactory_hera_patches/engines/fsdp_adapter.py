"""A LoRA adapter saved and loaded whole under FSDP2 (``FULL_STATE_DICT``), for every stage.

Before accelerate 1.15.0, ``save_fsdp_model`` / ``load_fsdp_model`` with ``adapter_only=True`` write rank 0's DTensor
shard of each matrix and restore nothing on other ranks (docs/configurations.md, N13). There this patch gets and sets
the adapter with torch's gathered state dict functions, as the fix does, right after ``accelerate.utils.fsdp_utils``
executes (its savers look the helpers up at call time).

The file holds whole tensors under PEFT's names (``...lora_A.weight``), as accelerate 1.11 names its shards: a reader
without the plugin refuses it rather than reset the adapter; a file of rank 0's shards is refused here.

:func:`unsaved_state_dict`: FSDP2's default ``SHARDED_STATE_DICT`` exits 0 with no adapter or model written
(docs/configurations.md, N20).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line

from ..guard import require

_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")
_HELPERS = ("_get_model_state_dict", "_set_model_state_dict", "is_peft_model", "save_fsdp_model", "load_fsdp_model")


def lacks_fix(fsdp_utils: ModuleType) -> bool:
    """True when this accelerate's adapter-only state dict ignores ``sd_options`` (before 1.15.0)."""
    try:
        source = inspect.getsource(fsdp_utils._get_model_state_dict)
    except (OSError, TypeError):  # no source (frozen install): the shape check decides
        return True
    return "full_state_dict" not in source


def launched_fsdp_version(environ: Mapping[str, str]) -> str | None:
    """The FSDP version ``accelerate launch`` set ("1" when unnamed, as accelerate reads it), None without FSDP."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    return (environ.get("FSDP_VERSION") or "1").strip()


def unsaved_state_dict(environ: Mapping[str, str]) -> str | None:
    """What ``accelerate launch`` set that makes the Trainer save no adapter or model, else None."""
    version = launched_fsdp_version(environ)
    if version is None:
        return None
    default = "FULL_STATE_DICT" if version == "1" else "SHARDED_STATE_DICT"
    value = environ.get("FSDP_STATE_DICT_TYPE")
    if (value or default).strip().upper() in {"FULL_STATE_DICT", "1"}:  # StateDictType's name or value
        return None
    return (
        f"FSDP_STATE_DICT_TYPE={value}"
        if value
        else f"no FSDP_STATE_DICT_TYPE (accelerate's FSDP{version} default: {default})"
    )


def unsaved_refusal(stage: str, environ: Mapping[str, str], note: bool = False) -> str | None:
    """One-line refusal of a run :func:`unsaved_state_dict` would leave unsaved, else None; with ``note``, a warning
    for a run that goes on (a host stage's)."""
    shown = unsaved_state_dict(environ)
    if shown is None:
        return None
    start, what, end = (
        (
            line("warning: "),
            "saves only resumable sharded checkpoints (checkpoint-N/pytorch_model_fsdp_0/), no adapter or model",
            " to have them",
        )
        if note
        else ("", "would exit 0 with no adapter or model saved", "")
    )
    return (
        f"{start}ACCELERATE_USE_FSDP={environ['ACCELERATE_USE_FSDP']} (FSDP_VERSION="
        f"{environ.get('FSDP_VERSION', '1')}), set by accelerate launch with an FSDP config, {shown}: stage: "
        f"{stage} {what} (transformers' Trainer writes them under FSDP only with FULL_STATE_DICT); set "
        f"fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config{end}."
    )


def _peft_names(model: Any) -> dict[str, str]:
    """Each trainable parameter's torch name -> PEFT's (torch's where PEFT names none)."""
    from peft import get_peft_model_state_dict  # lazy: as accelerate's own

    params = {_WRAPPERS.sub("", name): param for name, param in model.named_parameters() if param.requires_grad}
    named = {
        id(value): name
        for name, value in get_peft_model_state_dict(
            model, state_dict=params, adapter_name=model.active_adapter, save_embedding_layers=False
        ).items()
    }
    return {name: named.get(id(param), name) for name, param in params.items()}


def _whole(options: Any) -> bool:
    """FSDP2 with a full state dict (accelerate passes ``sd_options`` only under FSDP2)."""
    return options is not None and getattr(options, "full_state_dict", False)


def apply(fsdp_utils: ModuleType) -> None:
    # a fixed accelerate needs nothing: checked first, so a later rename never fails a host process
    if hasattr(fsdp_utils, "_get_model_state_dict") and not lacks_fix(fsdp_utils):
        return
    require(fsdp_utils, _HELPERS, "fsdp_adapter")
    original_get = fsdp_utils._get_model_state_dict
    original_set = fsdp_utils._set_model_state_dict

    def _get_model_state_dict(model: Any, adapter_only: bool = False, sd_options: Any = None) -> Any:
        if adapter_only and _whole(sd_options) and fsdp_utils.is_peft_model(model):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict  # lazy: as accelerate's own

            whole = get_model_state_dict(model, options=dataclasses.replace(sd_options, ignore_frozen_params=True))
            names = _peft_names(model)
            return {names.get(name, name): value for name, value in whole.items()}
        return original_get(model, adapter_only=adapter_only, sd_options=sd_options)

    def _set_model_state_dict(model: Any, state_dict: Any, adapter_only: bool = False, sd_options: Any = None) -> Any:
        if adapter_only and _whole(sd_options) and fsdp_utils.is_peft_model(model):
            # lazy: as accelerate's own
            from torch.distributed.checkpoint.state_dict import set_model_state_dict
            from torch.distributed.tensor import DTensor

            torch_names = {peft: name for name, peft in _peft_names(model).items()}
            shards = any(isinstance(value, DTensor) for value in state_dict.values())
            state_dict = {torch_names.get(name, name): value for name, value in state_dict.items()}
            if state_dict and (shards or not set(torch_names.values()) & set(state_dict)):  # rank 0 read the file;
                # the others wait in its broadcast: a RecipeError ends them too (job_refusal), said once
                raise RecipeError(
                    "resume_from_checkpoint: the FSDP2 checkpoint's pytorch_model_fsdp.bin holds an adapter saved "
                    "without llamafactory-hera by accelerate before 1.15 (rank 0's shard of each matrix only), which "
                    "cannot be restored whole; start again from the last checkpoint saved with llamafactory-hera, or "
                    "from the start."
                )
            return set_model_state_dict(model, state_dict, options=dataclasses.replace(sd_options, strict=False))
        return original_set(model, state_dict, adapter_only=adapter_only, sd_options=sd_options)

    fsdp_utils._get_model_state_dict = _get_model_state_dict
    fsdp_utils._set_model_state_dict = _set_model_state_dict
