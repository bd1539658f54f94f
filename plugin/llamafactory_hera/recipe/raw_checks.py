"""The checks every plugin stage runs before LLaMA-Factory's parse (also in the launchers, before any rank starts),
each one line naming the key, the value and the fix where the run would end later or in a traceback. Resumed
checkpoint: :mod:`.resume`; after the parse: :mod:`.parsed_checks`.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import os
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

from llamafactory_hera.recipe.fsdp import check_fsdp
from llamafactory_hera.recipe.host_keys import check_bf16_device, check_host_keys
from llamafactory_hera.recipe.model_checks import check_lora_target
from llamafactory_hera.recipe.model_paths import check_model_paths
from llamafactory_hera.recipe.quantization import dora_refusal, width_refusal
from llamafactory_hera.recipe.stack_checks import check_stack
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import given_keys, raw_value, truthy

# why a stage cannot read its rows from an iterable (streamed) dataset
_STREAMING = {
    "hera": "accelerate's batch dispatcher concatenates a streamed dataset's batches, and HeRA's per-row list-valued "
    "batch keys (image paths, teacher rows) cannot be concatenated: TypeError at the first step, even on "
    "one process",
    "rah": "RAH-LoRA draws its probe and calibration rows by index from the whole dataset",
    "harc": "HARC draws its extraction, validation and training rows by index from whole role datasets",
}


def _deepspeed_config_readable(value: str) -> bool:
    """A JSON file, or what accelerate also takes: inline or base64-encoded JSON."""
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


QLORA = "bitsandbytes>=0.50"  # pyproject.toml's qlora extra (tested); LLaMA-Factory asks 0.39
LIGER = "liger-kernel>=0.5.5"  # LLaMA-Factory 0.9.5's liger-kernel extra


def check_engines_installed(host_args: dict[str, Any] | list[str], stage: str) -> None:
    """The engines a recipe names are installed (else a 60-558 line traceback at the parse or load). After the
    method's checks: RAH-LoRA refuses DeepSpeed and Liger in its own words."""
    bits = raw_value(host_args, "quantization_bit")
    bnb = str(raw_value(host_args, "quantization_method") or "bnb").strip().lower() == "bnb"
    # refused whatever is installed: said first
    if bnb and bits not in (None, "") and (refused := width_refusal(bits)):
        raise RecipeError(refused)
    if bnb and bits not in (None, "") and truthy(raw_value(host_args, "use_dora")):
        raise RecipeError(dora_refusal(bits))
    # any model type: LLaMA-Factory's parse requires liger-kernel (hparams/parser.py), even with no kernel for the type
    liger = next((key for key in ("enable_liger_kernel", "use_liger_kernel") if truthy(raw_value(host_args, key))), "")
    for key, value, package, modules, requirement, without in (
        (
            "deepspeed",
            raw_value(host_args, "deepspeed"),
            "DeepSpeed",
            ("deepspeed",),  # lazy: transformers only here
            lambda: import_module("transformers.dependency_versions_table").deps.get("deepspeed", "deepspeed"),
            "or remove deepspeed to train without it",
        ),
        (
            "quantization_bit",
            bits if bnb else None,
            "bitsandbytes",
            ("bitsandbytes",),
            lambda: QLORA,
            "llamafactory-hera's qlora extra: pip install '.[qlora]' in its clone; or remove quantization_bit to "
            "train unquantized",
        ),
        (
            liger,
            "true" if liger else None,
            "liger-kernel",
            ("liger_kernel",),
            lambda: LIGER,
            f"or remove {liger} to train without it",
        ),
        (
            # LLaMA-Factory's parse requires its text metrics' packages for a generating predict, on every rank
            "predict_with_generate",
            "true" if truthy(raw_value(host_args, "predict_with_generate")) else None,
            "the packages of LLaMA-Factory's BLEU and ROUGE scores (jieba, nltk, rouge-chinese)",
            ("jieba", "nltk", "rouge_chinese"),
            lambda: "jieba nltk rouge-chinese",
            "or remove predict_with_generate to predict without generating",
        ),
    ):
        if (
            value is None
            or str(value).strip().lower() in {"", "none", "null"}
            or all(importlib.util.find_spec(module) is not None for module in modules)
        ):
            continue
        # one requirement is quoted (a version range); several are plain names
        wanted = requirement() if len(modules) > 1 else f"'{requirement()}'"
        raise RecipeError(
            f"{key}: {value} needs {package}, which {'are' if len(modules) > 1 else 'is'} not installed here. "
            f"Install {'them' if len(modules) > 1 else 'it'}: pip install {wanted} ({without})."
        )


def check_precision_and_deepspeed(host_args: dict[str, Any] | list[str]) -> None:
    if truthy(raw_value(host_args, "fp16")) and truthy(raw_value(host_args, "bf16")):
        raise RecipeError(
            "fp16: true and bf16: true: a run trains in one precision; keep bf16: true (GPUs since "
            "Ampere) and remove fp16, or keep fp16: true on older GPUs."
        )
    deepspeed = raw_value(host_args, "deepspeed")
    if isinstance(deepspeed, str) and deepspeed.strip() and not _deepspeed_config_readable(deepspeed):
        where = Path(deepspeed).expanduser()
        relative = "" if where.is_absolute() else f", relative to the folder the run starts in ({Path.cwd()})"
        raise RecipeError(
            f"deepspeed: {deepspeed} is not a file{relative}. Point it at a DeepSpeed JSON config "
            "(e.g. recipes/deepspeed/ds_z3_config.json, run from the repository root) or remove it."
        )


def check_streaming(stage: str, host_args: dict[str, Any] | list[str]) -> None:
    if truthy(value := raw_value(host_args, "streaming")):
        reason = _STREAMING.get(stage, "the stage reads its rows by index")
        raise RecipeError(
            f"streaming: {str(value).lower()} is not supported by stage: {stage} ({reason}). Remove "
            "streaming: the datasets are read once and cached on disk."
        )


def check_raw_launch(
    stage: str, host_args: dict[str, Any] | list[str], environ: Mapping[str, str] | None = None
) -> None:
    check_precision_and_deepspeed(host_args)
    check_fsdp(stage, host_args, os.environ if environ is None else environ)
    check_streaming(stage, host_args)


def check_raw_recipe(host_args: dict[str, Any] | list[str], stage: str, machine: bool = True) -> None:
    """The LLaMA-Factory keys, after the method's checks (more specific), ``lora_target`` last (it reads the config);
    values before their engines (installing one would not fix a wrong value)."""
    given = given_keys(host_args)
    check_host_keys(host_args)
    if machine:
        check_engines_installed(host_args, stage)
        check_model_paths(given)
        check_stack(given)
        check_bf16_device(host_args)
    check_lora_target(given)
