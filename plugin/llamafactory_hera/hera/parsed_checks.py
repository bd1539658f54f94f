"""HeRA's checks after LLaMA-Factory parsed the recipe, before any model or dataset loads: unsupported settings,
heads and teacher from their configs, an adapter's shapes against its base model. Run by
its run (``recipe/run.py``, phase 2); before the parse: :mod:`.raw_checks`; before the first step:
:mod:`.preparation_checks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version
from safetensors import safe_open
from transformers import AutoConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from llamafactory_hera.heads.architecture import layer_list
from llamafactory_hera.heads.geometry import attention_geometry, check_has_heads, check_heads_fit
from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.preparation_checks import check_contrastive_geometry, contrastive_geometry
from llamafactory_hera.hera.selection.auto import short_ddp_timeout_warning
from llamafactory_hera.hera.teacher import check_teacher_source
from llamafactory_hera.recipe.parsed_checks import check_run_inputs
from llamafactory_hera.recipe.quantization import check_quantization
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line
from llamafactory_hera_patches.data.templates import template_tokens
from llamafactory_hera_patches.guard import host_version

# from 0.19.3 (deepspeedai/DeepSpeed#8148) ZeRO-3 keeps frozen parameters whole in a non-reentrant recompute;
# before, the recompute sees them partitioned (shape [0]) and backward fails
ZERO3_FROZEN_RECOMPUTE_FIX = Version("0.19.3")


# (attribute, holder, why HeRA cannot work with it)
_INCOMPATIBLE = (
    # neat_packing first: LLaMA-Factory turns packing on when neat_packing is set
    ("neat_packing", "data", "packed sequences mix several samples in one row"),
    (
        "packing",
        "data",
        "packed sequences mix several samples in one row, so per-sample head representations "
        "and teacher neighbours cannot be formed",
    ),
    ("use_mca", "finetuning", "Megatron-Core training does not use the SFT trainer HeRA extends"),
    ("use_hyper_parallel", "finetuning", "the hyper-parallel SFT workflow does not use the trainer HeRA extends"),
    ("use_kt", "model", "KTransformers replaces the attention modules whose o_proj HeRA reads"),
    ("use_unsloth", "model", "Unsloth replaces the attention kernels and its own gradient checkpointing"),
    (
        "use_unsloth_gc",
        "model",
        "Unsloth's gradient checkpointing runs each layer's forward under torch.no_grad, so "
        "the captured o_proj inputs carry no gradient and HeRA would train only the selected heads' W_O columns; "
        "HeRA runs the layers of its heads under LLaMA-Factory's non-reentrant checkpointing, which keeps the gradient",
    ),
    (
        "galore_layerwise",
        "finetuning",
        "layer-wise GaLore updates inside backward hooks and skips the temperature parameter group",
    ),
    (
        "apollo_layerwise",
        "finetuning",
        "layer-wise APOLLO updates inside backward hooks and skips the temperature parameter group",
    ),
)


def check_heads_of(hera_args: HeraArguments, config: Any, model: str) -> Any:
    """Check the heads against ``config`` (it has heads, the named ones exist, ``auto``'s count fits; also
    ``plan``'s check); return its attention geometry."""
    geometry = attention_geometry(config)
    check_has_heads(geometry, config, "stage: hera")
    if not hera_args.auto_heads:
        check_heads_fit(hera_args.hera_heads, geometry, model)
    elif hera_args.hera_select_num_heads > geometry.num_model_heads:
        raise RecipeError(
            f"hera_select_num_heads: got {hera_args.hera_select_num_heads}; allowed range is 1.."
            f"{geometry.num_model_heads} (the heads of {model}, in layers "
            f"{layer_list(list(geometry.head_layers))})."
        )
    return geometry


def check_trains(training_args: Any) -> None:
    """Require ``do_train``: without it LLaMA-Factory builds an inference model (nothing trainable), and the run
    would fail only at the frozen-heads check after loading, with misleading lora_target advice."""
    if getattr(training_args, "do_train", True):
        return
    raise RecipeError(
        "do_train: false: stage: hera trains (its loss exists only in training steps; LLaMA-Factory's "
        "do_train is false when the recipe does not set it). Set do_train: true. To evaluate or predict "
        "with a trained HeRA run, use llamafactory-hera eval OUTPUT_DIR, or stage: sft with "
        "adapter_name_or_path: OUTPUT_DIR (LoRA) or model_name_or_path: OUTPUT_DIR (full, freeze)."
    )


def check_multimodal(model_args: Any, data_args: Any, config: Any) -> None:
    """Require an image model and a ``template`` with an image plugin (else LLaMA-Factory fails after tokenizing)."""
    kind = str(getattr(config, "model_type", "?"))
    if getattr(config, "vision_config", None) is None:
        raise RecipeError(
            f"model_name_or_path: {model_args.model_name_or_path} is a text-only model ({kind}); stage: "
            "hera aligns a multimodal model's attention heads with an image teacher. Use an MLLM (e.g. "
            "Qwen/Qwen2.5-VL-7B-Instruct with template: qwen2_vl), or stage: sft."
        )
    name = getattr(data_args, "template", None)
    template = template_tokens().get(name) if name else None
    if not name or (template is not None and not template.multimodal):
        what = f"template: {name} has no image plugin" if name else "template: not set"
        raise RecipeError(
            f"{what}; stage: hera trains on image rows of {model_args.model_name_or_path} ({kind}), "
            "whose image tokens the template's plugin inserts. Set the model's multimodal template "
            "(e.g. qwen2_vl for Qwen2.5-VL, qwen3_vl for Qwen3-VL, llava for LLaVA-1.5)."
        )


def zero3_frozen_recompute_warning(
    finetuning_type: str, zero3: bool, checkpointing: bool, deepspeed_version: str
) -> str | None:
    """The warning for LoRA + ZeRO-3 + gradient checkpointing on DeepSpeed before :data:`ZERO3_FROZEN_RECOMPUTE_FIX`
    (the heads' layers checkpoint non-reentrantly), else None."""
    try:
        affected = Version(deepspeed_version) < ZERO3_FROZEN_RECOMPUTE_FIX
    except InvalidVersion:
        return None
    if not (affected and zero3 and checkpointing and finetuning_type == "lora"):
        return None
    return line(
        f"warning: DeepSpeed ZeRO-3 with finetuning_type: lora and gradient checkpointing on "
        f"deepspeed {deepspeed_version}: HeRA runs its heads' layers under non-reentrant checkpointing, whose "
        "recompute of their frozen base weights can fail in backward (CheckpointError ... recomputed shape [0]) "
        "before deepspeed 0.19.3 (deepspeedai/DeepSpeed#8148). Upgrade deepspeed, or use ZeRO-2 "
        "(recipes/deepspeed/ds_z2_config.json)."
    )


def validate_host_args(
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    hera_args: HeraArguments,
) -> None:
    """Refuse settings HeRA cannot honour, in seconds (heads and teacher from configs, before the MLLM loads).
    Gradient checkpointing stays the recipe's except the heads' layers (non-reentrant, ``layer_checkpointing``)."""
    holders = {"data": data_args, "finetuning": finetuning_args, "model": model_args}
    check_trains(training_args)
    check_run_inputs(model_args, data_args, training_args, stage="hera")
    for attribute, holder, why in _INCOMPATIBLE:
        if getattr(holders[holder], attribute, False):
            raise RecipeError(
                f"stage: hera cannot run with {attribute}: true ({why}). Remove {attribute} or use stage: sft."
            )
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=getattr(model_args, "trust_remote_code", False)
    )
    check_quantization(model_args, config, "hera", "W_O per head", bool(getattr(finetuning_args, "use_dora", False)))
    check_multimodal(model_args, data_args, config)
    geometry = check_heads_of(hera_args, config, str(model_args.model_name_or_path))
    adapters = model_args.adapter_name_or_path
    check_adapter_fits(
        adapters if isinstance(adapters, list) else [adapters] if adapters else [],
        geometry.hidden_size,
        {
            geometry.num_heads * geometry.head_dim_of(layer)
            for layer in geometry.head_layers or range(geometry.num_layers)
        },
        str(model_args.model_name_or_path),
    )
    check_teacher_source(hera_args.hera_teacher, hera_args.hera_teacher_feature)
    if hera_args.auto_heads and getattr(training_args, "process_index", 0) == 0:
        warning = short_ddp_timeout_warning(
            int(getattr(training_args, "world_size", 1)), getattr(training_args, "ddp_timeout", None)
        )
        if warning:
            print(warning, flush=True)
    if getattr(training_args, "deepspeed", None) and getattr(training_args, "process_index", 0) == 0:
        warning = zero3_frozen_recompute_warning(
            str(getattr(finetuning_args, "finetuning_type", "")),
            is_deepspeed_zero3_enabled(),
            not getattr(model_args, "disable_gradient_checkpointing", False)
            or bool(getattr(training_args, "gradient_checkpointing", False)),
            host_version("deepspeed"),
        )
        if warning:
            print(warning, flush=True)
    geometry = contrastive_geometry(hera_args, training_args.per_device_train_batch_size, training_args.world_size)
    check_contrastive_geometry(geometry, hera_args)


def check_adapter_fits(adapters: list[str], hidden_size: int, attention_widths: set[int], model_name: str) -> None:
    """Refuse a local adapter whose o_proj LoRA shapes miss ``hidden_size`` / ``attention_widths`` (``num_heads *
    head_dim`` per layer); hub ids skipped, no weight loaded."""
    for adapter in adapters:
        weights = Path(adapter) / "adapter_model.safetensors"
        config = Path(adapter) / "adapter_config.json"
        if not weights.is_file():
            continue
        base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
        with safe_open(str(weights), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                if ".self_attn.o_proj.lora_A" in name and shape[1] not in attention_widths:
                    widths = " or ".join(map(str, sorted(attention_widths)))
                    raise RecipeError(
                        f"adapter_name_or_path: {adapter} was trained on another base model (its o_proj LoRA expects "
                        f"inputs of width {shape[1]}, {model_name} has {widths}; the adapter's base is "
                        f"{base or 'unknown'}). Use an adapter of this base model."
                    )
                if ".self_attn.o_proj.lora_B" in name and shape[0] != hidden_size:
                    raise RecipeError(
                        f"adapter_name_or_path: {adapter} was trained on another base model (o_proj "
                        f"output width {shape[0]}, {model_name} has {hidden_size}). Use an adapter of "
                        "this base model."
                    )
