"""A resumed run's weights restored under the model's names: ``Trainer._load_from_checkpoint`` loads a state dict as on
disk, in the original format (``save_pretrained`` reverts ``from_pretrained``'s renaming: LLaVA's
``language_model.model.*``, Qwen2-VL's ``model.*``), so such a model resumed with no weight restored. Keys are renamed
with transformers' own functions; restoring fewer tensors than the run trains is an error. DeepSpeed and FSDP keep the
Trainer's path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from llamafactory_hera.runtime.errors import RecipeError

try:  # transformers >= 5: the conversion mapping from_pretrained applies
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key
except ImportError:  # transformers 4: ``_checkpoint_conversion_mapping`` (regex -> replacement)
    get_model_conversion_mapping = None

# (file, shard index), safetensors first, as from_pretrained looks
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_EXAMPLES = 3


def weight_files(folder: str) -> list[str]:
    """A checkpoint's whole-model weight files (one, or an index's shards); [] when none."""
    for single, index in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index), encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
    return []


def model_keys(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """``{checkpoint key: model key}``, renamed as ``from_pretrained`` does (mapping renamings, base-model prefix;
    idempotent). Weight converters (fused MoE experts) change tensors: their keys restore nothing, which
    :func:`check_restored` reports."""
    state = model.state_dict()
    if get_model_conversion_mapping is None:
        return _model_keys_v4(model, keys, state)
    conversions = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    renamings = [entry for entry in conversions if isinstance(entry, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None) or None
    renamed = {}
    for key in keys:
        name, _ = rename_source_key(key, renamings, [], prefix, state)
        renamed[key] = name if name in state or key not in state else key
    return renamed


def _model_keys_v4(model: nn.Module, keys: Iterable[str], state: dict[str, Any]) -> dict[str, str]:
    """:func:`model_keys` on transformers 4: the first matching ``_checkpoint_conversion_mapping`` pattern renames, then
    the base-model prefix is added or removed where that names a parameter."""
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    prefix = getattr(model, "base_model_prefix", None) or ""
    renamed = {}
    for key in keys:
        name = key
        for pattern, replacement in mapping.items():
            name, count = re.subn(pattern, replacement, key)
            if count:
                break
        candidates = [name, f"{prefix}.{name}" if prefix else name, name.removeprefix(f"{prefix}.") if prefix else name]
        found = next((candidate for candidate in candidates if candidate in state), None)
        renamed[key] = found if found is not None else key
    return renamed


def restore_weights(model: nn.Module, folder: str) -> None:
    """Load a whole-model checkpoint into ``model`` under its names; RecipeError unless every trained tensor was
    restored."""
    loaded: set[str] = set()
    unplaced: list[str] = []
    state_keys = set(model.state_dict())
    for path in weight_files(folder):
        if path.endswith(".safetensors"):
            tensors = load_file(path, device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        names = model_keys(model, tensors)
        renamed = {names[key]: tensor for key, tensor in tensors.items() if names[key] in state_keys}
        unplaced += sorted(key for key in tensors if names[key] not in state_keys)
        model.load_state_dict(renamed, strict=False)
        loaded.update(renamed)
        del tensors, renamed
    check_restored(model, folder, loaded, unplaced)


def restore_adapter(model: Any, folder: str) -> None:
    """Load a LoRA checkpoint into the active adapter (trainable, as the Trainer does); RecipeError unless every trained
    tensor was restored."""
    active = model.active_adapters[0] if hasattr(model, "active_adapters") else model.active_adapter
    result = model.load_adapter(folder, active, is_trainable=True)
    missing = set(getattr(result, "missing_keys", []) or [])
    loaded = {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in missing}
    check_restored(model, folder, loaded, list(getattr(result, "unexpected_keys", []) or []))


def check_restored(model: nn.Module, folder: str, loaded: set[str], unplaced: list[str]) -> None:
    """RecipeError when a trained parameter (under any of its tied names) is not in ``loaded``."""
    names_of: dict[int, list[str]] = {}
    trained: dict[int, nn.Parameter] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
        if parameter.requires_grad:
            trained[id(parameter)] = parameter
    missing = sorted(names_of[key][0] for key in trained if not set(names_of[key]) & loaded)
    if not missing:
        return
    restored = len(trained) - len(missing)
    found = (
        f"; its tensors that fit no parameter of this model, e.g. {', '.join(unplaced[:_EXAMPLES])}" if unplaced else ""
    )
    raise RecipeError(
        f"resume_from_checkpoint: {folder} restores {restored} of the {len(trained)} tensors this run trains "
        f"({len(missing)} not in it, e.g. {', '.join(missing[:_EXAMPLES])}{found}). Training on would start those "
        "from the base model's weights with the step count advanced. Resume from a checkpoint this recipe wrote "
        "(same model and finetuning_type), or start afresh: another output_dir, or overwrite_output_dir: true."
    )


def restored_here(trainer: Any, folder: str, model: nn.Module, adapters: bool) -> bool:
    """Load ``folder`` into ``model`` here where ``trainer`` would not rename (whole-model files; adapters if
    ``adapters``); False: the Trainer's path (DeepSpeed, FSDP, sharded adapters)."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    if hasattr(model, "peft_config") and hasattr(model, "load_adapter"):
        if not adapters or not any(os.path.isfile(os.path.join(folder, name)) for name in ADAPTER_FILES):
            return False
        restore_adapter(model, folder)
        return True
    if not weight_files(folder):
        return False  # the Trainer's error names what is missing
    restore_weights(model, folder)
    return True
