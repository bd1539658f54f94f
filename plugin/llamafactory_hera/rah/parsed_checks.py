"""RAH-LoRA's checks of the parsed arguments and the model's config, before anything loads."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from llamafactory_hera.heads.architecture import describe, layer_list, per_head_value_layers, plan_layers
from llamafactory_hera.heads.geometry import attention_geometry
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.recipe.fsdp import RAH_ONE_PROCESS
from llamafactory_hera.recipe.parsed_checks import check_run_inputs
from llamafactory_hera.recipe.quantization import check_quantization
from llamafactory_hera.runtime.errors import RecipeError


def validate_host_args(
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    rah_args: RahArguments,
) -> None:
    """Checks on the parsed arguments and the model's config; eager attention."""
    if getattr(training_args, "world_size", 1) > 1:
        raise RecipeError(f"{training_args.world_size} processes: {RAH_ONE_PROCESS}.")
    if model_args.adapter_name_or_path:
        raise RecipeError(
            "stage: rah calibrates the base model; adapter_name_or_path is set. Merge the adapter first "
            "(llamafactory-cli export) and calibrate the merged model."
        )
    if not data_args.dataset:
        raise RecipeError("dataset: stage: rah needs unlabelled image-text rows to calibrate on; name a dataset.")
    check_run_inputs(model_args, data_args, training_args, stage="rah")

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=getattr(model_args, "trust_remote_code", False)
    )
    if not any(isinstance(getattr(config, name, None), int) for name in ("image_token_id", "image_token_index")):
        raise RecipeError(
            f"stage: rah: {model_args.model_name_or_path} (model_type "
            f"'{getattr(config, 'model_type', '?')}') names no image token; RAH-LoRA calibrates the "
            "heads of a multimodal model by their attention between text and image tokens."
        )
    check_quantization(
        model_args, config, "rah", "V and O weights per head", dora=bool(getattr(finetuning_args, "use_dora", False))
    )
    plans = plan_layers(config)
    calibratable, left = per_head_value_layers(plans, attention_geometry(config).head_dim)
    if not calibratable:
        raise RecipeError(
            f"stage: rah cannot run on model_type '{getattr(config, 'model_type', '?')}': no decoder "
            "layer has softmax self-attention whose heads own their V and O projections "
            f"({describe(plans)}). Use another model."
        )
    asked = rah_args.layer_list(len(plans), calibratable)  # raises naming rah_layers
    named = [layer for layer in asked if layer in left]
    if named and len(named) == len(asked):
        why = ", ".join(f"L{i}: {left[i]}" for i in named)
        raise RecipeError(
            f"rah_layers: none of the layers named can be calibrated ({why}); "
            f"the calibratable layers of {model_args.model_name_or_path} are {layer_list(calibratable)}. "
            "Use auto or name some of those."
        )
    samples_needed = max(rah_args.rah_probe_samples, rah_args.rah_kl_samples)
    if data_args.max_samples is not None and data_args.max_samples < samples_needed:
        raise RecipeError(
            f"max_samples: {data_args.max_samples} is fewer than the {samples_needed} rows the probes "
            "need (rah_probe_samples / rah_kl_samples). Raise max_samples or lower those keys."
        )
    model_args.flash_attn = "disabled"  # eager attention: LLaMA-Factory's AttentionFunction.DISABLED
