"""Checks every plugin stage runs on the recipe's own keys and the launch environment, before LLaMA-Factory parses the
recipe (nothing is loaded yet). Called once, by the stage patch, for every method's stage.

Each raises one ``ValueError`` naming the key, the value and the fix, where the run would otherwise end with an
unrelated message or a traceback, some of them only after the model and the teacher loaded:

- ``fp16`` and ``bf16`` both true (transformers names the CPU's missing bf16, or fails later, not the conflict);
- a ``deepspeed`` config path that is not a file (accelerate's "Expected a string path to an existing deepspeed
  config" while the arguments are built);
- FSDP, from the recipe (``fsdp``, ``fsdp_config``) or from ``accelerate launch`` with an FSDP config
  (``ACCELERATE_USE_FSDP``, with ``FSDP_VERSION`` 1 or 2): every method reads whole weights outside the wrapped
  forward, which FSDP shards (why, per method: :data:`_FSDP`); the run would load the model and the teacher, then fail
  at the first projection. DeepSpeed ZeRO is the supported sharding (HeRA, HARC);
- ``streaming: true``: every stage reads its rows as a map-style dataset (see :data:`_STREAMING`).

:func:`check_raw_recipe`, run after these and the method's own raw checks, runs the checks of the keys LLaMA-Factory
reads (:mod:`.host_keys`: unknown keys, values outside a key's choices, ``template``, numbers) and of the model
(:mod:`.model_checks`: model and adapter paths, ``lora_target``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamafactory_hera.recipe.host_keys import check_bf16_device, check_host_keys
from llamafactory_hera.recipe.keys import truthy
from llamafactory_hera.recipe.model_checks import check_lora_target, check_model_paths
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches.arguments import given_keys, raw_value

# why a stage cannot read its rows from an iterable (streamed) dataset
_STREAMING = {
    "hera": "accelerate's batch dispatcher concatenates a streamed dataset's batches, and HeRA's per-row list-valued "
            "batch keys (image paths, teacher rows) cannot be concatenated: TypeError at the first step, even on "
            "one process",
    "rah": "RAH-LoRA draws its probe and calibration rows by index from the whole dataset",
    "harc": "HARC draws its extraction, validation and training rows by index from whole role datasets",
}
_FSDP = {
    "hera": "HeRA slices o_proj's weight by head and its monitor reads it between steps, outside the wrapped forward "
            "where FSDP gathers it",
    "rah": "RAH-LoRA runs on one process and edits whole V and O weights",
    "harc": "HARC reads the residual stream and the LoRA reference (adapter disabled) outside FSDP's wrapped forward",
}
_FSDP_FIX = {
    "rah": "run it on one process: CUDA_VISIBLE_DEVICES=0 llamafactory-cli train RECIPE",
}
_DEFAULT_FSDP_FIX = ("shard with DeepSpeed ZeRO instead (deepspeed: recipes/deepspeed/ds_z3_config.json or "
                     "ds_z2_config.json), or run one process")


def _set(value: Any) -> bool:
    """A recipe value that turns something on (not absent, empty, ``false`` or an empty list / dict)."""
    if isinstance(value, bool):
        return value
    return bool(value) and str(value).strip().lower() not in {"", "false", "0", "no", "off", "none", "[]", "{}"}


def _fsdp_refusal(stage: str, what: str, fix: str = _DEFAULT_FSDP_FIX) -> RecipeError:
    reason = _FSDP.get(stage, "the stage reads whole weights outside the wrapped forward, which FSDP shards")
    return RecipeError(f"{what}: stage: {stage} cannot run under FSDP ({reason}); {_FSDP_FIX.get(stage, fix)}.")


def check_fsdp(stage: str, host_args: dict[str, Any] | list[str], environ: Mapping[str, str]) -> None:
    """No FSDP from the recipe's ``fsdp`` / ``fsdp_config`` or from ``accelerate launch``'s environment."""
    value = raw_value(host_args, "fsdp")
    if _set(value):  # fsdp_config alone is ignored by transformers (it warns), so it is no FSDP run
        config = raw_value(host_args, "fsdp_config")
        raise _fsdp_refusal(stage, f"fsdp: {value}" + (f" (fsdp_config: {config})" if _set(config) else ""))
    used = environ.get("ACCELERATE_USE_FSDP", "")
    if used.lower() == "true":  # exactly how accelerate's Accelerator reads it (1.11: "1" does not turn FSDP on)
        version = environ.get("FSDP_VERSION")
        shown = f"ACCELERATE_USE_FSDP={used}" + (f" (FSDP_VERSION={version})" if version else "")
        raise _fsdp_refusal(stage, f"{shown}, set by accelerate launch with an FSDP config",
                            "launch with llamafactory-cli train, or accelerate launch with a DeepSpeed config (ZeRO "
                            "is the supported sharding), not an FSDP one")


def check_fsdp_parsed(stage: str, training_args: Any) -> None:
    """The parsed ``fsdp`` option (set by any front end, e.g. LlamaBoard's extra arguments) is empty."""
    value = getattr(training_args, "fsdp", None)
    if value:
        shown = " ".join(str(getattr(option, "value", option)) for option in value) if isinstance(value, list) \
            else value
        raise _fsdp_refusal(stage, f"fsdp: {shown}")


def _deepspeed_config_readable(value: str) -> bool:
    """A JSON file, or what accelerate also accepts in its place: inline JSON or base64-encoded JSON."""
    text = value.strip()
    if Path(text).expanduser().is_file():
        return True
    try:
        json.loads(text)
        return True
    except ValueError:
        pass
    try:
        json.loads(base64.b64decode(text, validate=True).decode("utf-8"))
        return True
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False


def check_precision_and_deepspeed(host_args: dict[str, Any] | list[str]) -> None:
    """``fp16`` and ``bf16`` are not both on; a ``deepspeed`` path names a file."""
    fp16, bf16 = raw_value(host_args, "fp16"), raw_value(host_args, "bf16")
    if fp16 is not None and bf16 is not None and truthy(fp16) and truthy(bf16):
        raise RecipeError("fp16: true and bf16: true: a run trains in one precision; keep bf16: true (GPUs since "
                          "Ampere) and remove fp16, or keep fp16: true on older GPUs.")
    deepspeed = raw_value(host_args, "deepspeed")
    if isinstance(deepspeed, str) and deepspeed.strip() and not _deepspeed_config_readable(deepspeed):
        where = Path(deepspeed).expanduser()
        relative = "" if where.is_absolute() else f", relative to the folder the run starts in ({Path.cwd()})"
        raise RecipeError(f"deepspeed: {deepspeed} is not a file{relative}. Point it at a DeepSpeed JSON config "
                          "(e.g. recipes/deepspeed/ds_z3_config.json, run from the repository root) or remove it.")


def check_streaming(stage: str, host_args: dict[str, Any] | list[str]) -> None:
    """``streaming`` is off: every stage reads its rows as a map-style dataset."""
    value = raw_value(host_args, "streaming")
    if value is not None and truthy(value):
        reason = _STREAMING.get(stage, "the stage reads its rows by index")
        raise RecipeError(f"streaming: {str(value).lower()} is not supported by stage: {stage} ({reason}). Remove "
                          "streaming: the datasets are read once and cached on disk.")


def check_raw_launch(stage: str, host_args: dict[str, Any] | list[str],
                     environ: Mapping[str, str] | None = None) -> None:
    """Every check of this module, for a ``stage`` of the plugin, before LLaMA-Factory parses ``host_args``."""
    check_precision_and_deepspeed(host_args)
    check_fsdp(stage, host_args, os.environ if environ is None else environ)
    check_streaming(stage, host_args)


def check_raw_recipe(host_args: dict[str, Any] | list[str]) -> None:
    """What every plugin stage checks of the recipe's LLaMA-Factory keys before LLaMA-Factory parses them, after
    :func:`check_raw_launch` and the method's own raw checks (whose messages are the more specific): the keys
    (:mod:`.host_keys`), the model paths, this machine's bf16, and last ``lora_target`` against the model's modules
    (:mod:`.model_checks`, the one that reads the model's config)."""
    given = given_keys(host_args)
    check_host_keys(host_args)
    check_model_paths(given)
    check_bf16_device(host_args)
    check_lora_target(given)
