"""HARC's checks of the parsed arguments and the model's config, before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from llamafactory_hera.harc.config import ROLE_KEYS, HarcArguments
from llamafactory_hera.harc.layers import eligible_layers
from llamafactory_hera.recipe.dataset_info import DATA_CONFIG
from llamafactory_hera.recipe.parsed_checks import check_dataset_names, check_run_inputs
from llamafactory_hera.recipe.quantization import check_quantization
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.templates import composite_model_types


def validate_host_args(
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    harc_args: HarcArguments,
) -> None:
    if not data_args.template:
        raise RecipeError(
            "template: stage: harc locates the instruction's last token and the assistant header with "
            "the model's chat template; set template (e.g. llama3, qwen)."
        )
    dataset_dir = str(data_args.dataset_dir)
    if not dataset_dir.startswith(("REMOTE:", "ONLINE")):
        if not (Path(dataset_dir) / DATA_CONFIG).is_file():
            raise RecipeError(
                f"dataset_dir: {dataset_dir} has no {DATA_CONFIG}; the harc_* keys name datasets listed "
                "there (`llamafactory-hera harc-data --out DIR` writes one)."
            )
        for key in (*ROLE_KEYS, "harc_extract_harmful", "harc_extract_harmless"):
            if getattr(harc_args, key):
                check_dataset_names(
                    key, [getattr(harc_args, key)], dataset_dir, f"Add it there or name one of those in {key}."
                )
    check_run_inputs(model_args, data_args, training_args, datasets_used=False, stage="harc")

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=getattr(model_args, "trust_remote_code", False)
    )
    kind = str(getattr(config, "model_type", ""))
    if kind in composite_model_types() or any(
        getattr(config, key, None) is not None for key in ("vision_config", "audio_config")
    ):
        raise RecipeError(
            f"model_name_or_path: {model_args.model_name_or_path} is a multimodal model ({kind}); "
            "stage: harc trains text LLMs only (text rows, one decoder's layers). Use a text-only chat "
            "model (e.g. Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct)."
        )
    check_quantization(model_args, config, "harc", dora=bool(getattr(finetuning_args, "use_dora", False)))
    text = config.get_text_config()
    layers = int(text.num_hidden_layers)
    eligible = eligible_layers(layers, harc_args.harc_band)
    if len(eligible) < harc_args.harc_layers_final:
        raise RecipeError(
            f"harc_band: {harc_args.harc_band} leaves {len(eligible)} of {layers} decoder layers of "
            f"{model_args.model_name_or_path} to couple, fewer than harc_layers_final: "
            f"{harc_args.harc_layers_final}. Lower harc_band or harc_layers_final."
        )
    # Gradient checkpointing stays the recipe's: the coupling reads each coupled layer's input, which is the
    # checkpoint's own input and keeps its graph under reentrant checkpointing too (harc/residuals.py)
