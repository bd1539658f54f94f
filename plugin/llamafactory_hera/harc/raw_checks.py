"""HARC's checks of a recipe before LLaMA-Factory parses it. An absent ``dataset`` is set to ``harc_harmful`` only for
the parser: rows come from the ``harc_*`` role keys."""

from __future__ import annotations

from typing import Any

from llamafactory_hera.harc.config import HarcArguments, moving_weights
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy
from llamafactory_hera_patches.recipe.arguments import compile_setting


def _set(host_args: dict[str, Any] | list[str], key: str, value: Any) -> None:
    if isinstance(host_args, dict):
        host_args[key] = value  # typed, as YAML gives it
    else:
        host_args.extend([f"--{key}", str(value)])


def validate_raw_host_args(host_args: dict[str, Any] | list[str], harc_args: HarcArguments) -> None:
    """Refuse what HARC cannot run; fill ``dataset`` and the batch size when absent."""
    finetuning = str(raw_value(host_args, "finetuning_type") or "lora").strip().lower()
    if not any(moving_weights(harc_args).values()) and not raw_value(host_args, "adapter_name_or_path"):
        keys = ", ".join(f"{key}: {value:g}" for key, value in moving_weights(harc_args).items())
        raise RecipeError(
            f"{keys} leave only harc_weight_kl: {harc_args.harc_weight_kl:g}, and the KL to the "
            "adapter-free model is 0 with zero gradient while a new adapter is the identity, so nothing "
            "would train. Set harc_weight_couple: 1 and harc_weight_ce: 1 (reference)."
        )
    if finetuning != "lora":
        raise RecipeError(
            f"stage: harc trains a LoRA adapter (the KL reference is the model with its adapter "
            f"disabled); finetuning_type: {finetuning} has none. Set finetuning_type: lora."
        )
    batch = raw_value(host_args, "per_device_train_batch_size")
    rows = harc_args.harc_batch_harmful + harc_args.harc_batch_harmless + harc_args.harc_batch_pseudo
    if batch is None:
        _set(host_args, "per_device_train_batch_size", 1)
    elif str(batch).strip() != "1":
        if not str(batch).strip().isdigit() or int(str(batch).strip()) < 1:
            raise RecipeError(
                f"per_device_train_batch_size: got {batch}; with stage: harc it counts composed "
                "micro-batches per device step: a whole number >= 1 (1, the reference, when absent)."
            )
        say(
            f"note: per_device_train_batch_size: {batch} counts composed micro-batches with "
            f"stage: harc: each device step takes {int(str(batch).strip()) * rows} rows ({batch} x "
            f"{harc_args.harc_batch_harmful} harmful + {harc_args.harc_batch_harmless} harmless + "
            f"{harc_args.harc_batch_pseudo} pseudo); the reference takes one ({rows} rows): set it to 1 for that."
        )
    for key in ("packing", "neat_packing"):
        if truthy(value := raw_value(host_args, key)):
            raise RecipeError(
                f"{key}: {str(value).lower()} is not supported by stage: harc: it composes each "
                "micro-batch of whole rows of its role datasets and reads every row's residual stream at "
                "its own instruction and assistant-header positions, which packing several rows into "
                f"one sequence would mix. Remove {key}."
            )
    for key in ("do_eval", "do_predict", "predict_with_generate"):
        if truthy(raw_value(host_args, key)):
            raise RecipeError(
                f"{key}: stage: harc has no evaluation split of its own (it evaluates refusals on "
                "held-out rows at the end, see harc_eval). Remove it; to write predictions with the adapter, "
                "run stage: sft with do_train: false, adapter_name_or_path: this run's output_dir, do_predict: "
                "true and predict_with_generate: true."
            )
    if compiled := compile_setting(host_args):
        raise RecipeError(
            f"{compiled} is not supported by stage: harc: the compiled forward keeps the "
            "residual-stream readers it first traced (torch._dynamo skips guards on module hooks, "
            "skip_nnmodule_hook_guards) while HARC registers its readers anew each step, so a later "
            "step's residuals are not read (it stops: decoder layer N was not called). Remove "
            f"{compiled.partition(':')[0]}."
        )
    for key in ("val_size", "eval_dataset"):
        value = raw_value(host_args, key)
        if value not in (None, "", 0, "0", 0.0, "0.0"):
            raise RecipeError(
                f"{key}: stage: harc holds out its own validation rows (harc_validate_samples); remove {key}."
            )
    if raw_value(host_args, "do_train") is not None and not truthy(raw_value(host_args, "do_train")):
        raise RecipeError("stage: harc trains; set do_train: true.")
    cutoff = raw_value(host_args, "cutoff_len")
    if cutoff is not None:  # LlamaBoard always sends its "Cutoff length" box
        say(
            f"note: cutoff_len: {cutoff} is not used by stage: harc; harc_max_length: {harc_args.harc_max_length} "
            "limits each prompt (keeping its last tokens) and each answer (keeping its first tokens, then the "
            "template's closing tokens). Set harc_max_length instead."
        )
    if not raw_value(host_args, "dataset"):
        _set(host_args, "dataset", harc_args.harc_harmful)
    else:
        say("note: stage: harc reads its rows from the harc_* role keys; `dataset` is not used.")
