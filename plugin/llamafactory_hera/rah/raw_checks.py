"""RAH-LoRA's checks of a recipe before LLaMA-Factory parses it: what a one-process, training-free calibration cannot
run."""

from __future__ import annotations

import os
from typing import Any

from llamafactory_hera.job_refusal import several_nodes
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy
from llamafactory_hera_patches.recipe.arguments import compile_setting

_FAST_ATTENTION = {"fa2", "fa3", "sdpa"}


def validate_raw_host_args(host_args: dict[str, Any] | list[str], rah_args: RahArguments) -> None:
    """Refuse what a training-free calibration cannot run, naming the key and the fix."""
    if nodes := several_nodes():
        raise RecipeError(
            f"{nodes}: stage: rah runs as one process on one node (its model over that node's GPUs); "
            "launched on several nodes, each would calibrate the whole model into the same output_dir. "
            "Run it on one node (NNODES unset or 1, one srun task)."
        )
    workers = raw_value(host_args, "ray_num_workers")
    # LLaMA-Factory's is_env_enabled("USE_RAY"): true, y or 1; its default is one worker
    if os.environ.get("USE_RAY", "0").lower() in {"true", "y", "1"} and str(workers or 1).strip() != "1":
        raise RecipeError(
            f"USE_RAY={os.environ['USE_RAY']} with ray_num_workers: {workers}: stage: rah runs as one process "
            "that places the model over every visible GPU, and each Ray worker would calibrate the whole model "
            "into the same output_dir. Set ray_num_workers: 1, or unset USE_RAY."
        )
    attention = str(raw_value(host_args, "flash_attn") or "auto").strip().lower()
    if attention in _FAST_ATTENTION:
        raise RecipeError(
            f"stage: rah needs attention weights, which {attention} attention does not return; remove "
            "flash_attn (the stage loads the model with eager attention) or set flash_attn: disabled."
        )
    finetuning = str(raw_value(host_args, "finetuning_type") or "lora").strip().lower()
    if finetuning != "lora":
        raise RecipeError(
            f"stage: rah writes a LoRA adapter; finetuning_type: {finetuning} cannot hold it. Set "
            "finetuning_type: lora."
        )
    if raw_value(host_args, "deepspeed"):
        raise RecipeError("stage: rah takes no optimizer step and runs as one process; remove deepspeed.")
    liger = [f"{key}: true" for key in ("enable_liger_kernel", "use_liger_kernel") if truthy(raw_value(host_args, key))]
    if setting := compile_setting(host_args) or next(iter(liger), None):
        raise RecipeError(
            f"{setting} does nothing in stage: rah: its calibration runs the model in eval mode "
            "outside transformers' Trainer (nothing is compiled, and LLaMA-Factory applies Liger's "
            f"kernels only to a model it loads for training). Remove {setting.partition(':')[0]}."
        )
    if raw_value(host_args, "do_train") is not None and not truthy(raw_value(host_args, "do_train")):
        raise RecipeError("stage: rah calibrates with llamafactory-cli train; set do_train: true.")
    # predict_with_generate alone does nothing without them: taken, so a recipe that ran still runs
    for key in ("do_eval", "do_predict"):
        if truthy(raw_value(host_args, key)):
            raise RecipeError(
                f"{key}: stage: rah writes its adapter from a calibration and evaluates nothing. Remove it; to write "
                "predictions with the adapter, run stage: sft with do_train: false, adapter_name_or_path: this "
                "run's output_dir, do_predict: true and predict_with_generate: true."
            )
    for key in ("packing", "neat_packing"):
        if truthy(value := raw_value(host_args, key)):
            raise RecipeError(
                f"{key}: {str(value).lower()} is not supported by stage: rah: it scores each calibration "
                "row's attention between its own text and image tokens, which packing several rows into "
                f"one sequence would mix. Remove {key}."
            )
    resume = raw_value(host_args, "resume_from_checkpoint")
    if resume not in (None, "") and not (isinstance(resume, bool) and not resume):
        raise RecipeError(
            f"resume_from_checkpoint: {resume} does not apply to stage: rah: the calibration takes no "
            "optimizer step and writes no checkpoint to resume (it runs whole, in minutes). Remove "
            "resume_from_checkpoint."
        )
