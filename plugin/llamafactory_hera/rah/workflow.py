"""A ``stage: rah`` run: calibrate the recipe's model on its unlabelled image-text rows and write a LoRA adapter.

Called by the stage patch (declared in :mod:`llamafactory_hera.rah.method`) in place of ``run_sft``; no optimizer
step is taken. ``output_dir`` receives ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format, on
the touched language-model ``v_proj`` / ``o_proj`` modules), ``rah_profile.json`` and ``rah_profile.png``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from llamafactory_hera.anatomy.board_log import progress, say, start_board_files
from llamafactory_hera.rah.args import RahArguments
from llamafactory_hera.short_errors import RecipeError

PROFILE_JSON = "rah_profile.json"
PROFILE_PNG = "rah_profile.png"


def _image_rows(aligned: Any, datasets: list[str], rah_args: RahArguments, seed: int) -> list[int]:
    """Rows with at least one image, shuffled by ``seed``, at most ``rah_samples``; errors name the fix."""
    rows = [index for index, images in enumerate(aligned["_images"]) if images]
    needed = max(rah_args.rah_probe_samples, rah_args.rah_kl_samples)
    if not rows:
        raise RecipeError(f"dataset: {datasets} has no image in any of its {len(aligned)} rows; RAH-LoRA calibrates "
                          "heads by their attention between text and image tokens. Use image-text rows.")
    if len(rows) < needed:
        raise RecipeError(f"dataset: {datasets} has {len(rows)} image rows, fewer than the {needed} the probes need "
                          "(rah_probe_samples / rah_kl_samples). Add rows or lower those keys.")
    random.Random(seed).shuffle(rows)
    if len(rows) < rah_args.rah_samples:
        say(f"warning: {len(rows)} image rows, fewer than rah_samples: {rah_args.rah_samples}; calibrating on "
             f"{len(rows)}.")
    return rows[:rah_args.rah_samples]


def _say_what_was_left_out(calibration: Any, rows: int) -> None:
    """Console lines for what the JSON alone would hide: rows without a map or scored on one half of I-SAL,
    several image layouts."""
    if calibration.one_sided_samples:
        say(f"warning: {calibration.one_sided_samples} of {rows} rows have no text before their image (the attention "
            "sink apart): their I-SAL is the text->image half alone.")
    if calibration.maps_skipped:
        say(f"warning: {calibration.maps_skipped} of {rows} rows have no text after their image and give no "
            "text->image map (the attention similarity uses the others).")
    if calibration.map_layouts > 1:
        say(f"RAH-LoRA: the rows' images come in {calibration.map_layouts} layouts (grids of image tokens); the "
            "attention similarity averages the per-layout map cosines, weighted by rows (no row is left out).")


def _outcomes(calibration: Any, summary: dict[str, Any]) -> str:
    """``"2 of 5 targets calibrated, 1 rolled back, ..."`` (the parts that are not 0)."""
    parts = [f"{summary['calibrated']} of {summary['targets']} targets calibrated"]
    for key, words in (("rolled_back", "rolled back"), ("without_anchor", "without anchors"),
                       ("unchanged_in_model_dtype", f"unchanged (the step rounds to nothing in {calibration.dtype})")):
        if summary[key]:
            parts.append(f"{summary[key]} {words}")
    if summary["anchors_from_adjacent_layers"]:
        parts.append(f"{summary['anchors_from_adjacent_layers']} with anchors from adjacent layers (none in their "
                     "own)")
    return ", ".join(parts)


def _on(device: torch.device, batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("llamafactory-hera", "llamafactory", "transformers", "peft", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_rah(host: Any, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
            generating_args: Any, callbacks: Any, rah_args: RahArguments) -> None:
    """Calibrate and write the adapter and the profile (see the module docstring)."""
    from llamafactory_hera.rah.adapter import lora_factors, save_adapter
    from llamafactory_hera.rah.calibrate import calibrate, geometry_of
    from llamafactory_hera.rah.probe import attention_modules, token_kinds
    from llamafactory_hera.rah.profile import plot_profile, profile_record
    from llamafactory_hera_patches.model_data import (
        RecipeArgs,
        load_aligned_rows,
        load_model_for_scoring,
        multimodal_dataset_and_collator,
    )

    started = time.perf_counter()
    start_board_files()
    recipe = RecipeArgs(model_args, data_args, finetuning_args)
    rows = _image_rows(load_aligned_rows(recipe, training_args.seed), data_args.dataset, rah_args, training_args.seed)
    model, tokenizer_module, template = load_model_for_scoring(recipe, str(training_args.device))
    loaded = time.perf_counter()
    dataset, collator = multimodal_dataset_and_collator(recipe, model, tokenizer_module, template, training_args.seed,
                                                        rows)
    device = next(model.parameters()).device
    size = rah_args.rah_batch_size
    groups = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
    calibration_batches = [_on(device, collator([dataset[i] for i in group])) for group in groups]
    caf_batches = [_on(device, collator([dataset[i]])) for i in range(rah_args.rah_probe_samples)]
    kl_rows = list(range(rah_args.rah_kl_samples))
    kl_batches = [_on(device, collator([dataset[i] for i in kl_rows[j:j + size]]))
                  for j in range(0, len(kl_rows), size)]
    layers = rah_args.layer_list(len(attention_modules(model)))
    kinds = token_kinds(model, tokenizer_module["tokenizer"], tokenizer_module.get("processor"))
    say(f"RAH-LoRA: layers {layers[0]}..{layers[-1]} ({len(layers)}); {len(rows)} rows for I-SAL, "
         f"{rah_args.rah_probe_samples} for CAF, {rah_args.rah_kl_samples} for the KL probe; rank {rah_args.rah_rank}, "
         f"delta {rah_args.rah_delta}, alpha_max {rah_args.rah_alpha_max}; attention eager")
    calibration = calibrate(model, calibration_batches, caf_batches, kl_batches, rah_args, kinds, progress)
    _say_what_was_left_out(calibration, len(rows))
    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    factors = lora_factors(calibration, model, geometry_of(model))
    kept = [u for u in calibration.updates if u.calibrated]
    record = profile_record(calibration, rah_args, {
        "model_name_or_path": str(model_args.model_name_or_path), "dataset": list(data_args.dataset),
        "dataset_dir": str(data_args.dataset_dir), "template": str(data_args.template), "rows": rows,
        "seed": training_args.seed}, _versions(), {"total_s": round(time.perf_counter() - started, 3),
                                                    "without_model_loading_s": round(time.perf_counter() - loaded, 3)})
    (output / PROFILE_JSON).write_text(json.dumps(record, indent=2), encoding="utf-8")
    plot_profile(calibration, output / PROFILE_PNG, str(model_args.model_name_or_path))
    outcomes = _outcomes(calibration, record["summary"])
    if not kept:
        raise RecipeError(f"RAH-LoRA changed no weight: {outcomes}; no adapter was written. See "
                          f"{output / PROFILE_JSON}; a looser rah_delta, a larger rah_alpha_max or other rah_layers "
                          "may help.")
    names = save_adapter(model, factors, output, base_name=str(model_args.model_name_or_path))
    say(f"RAH-LoRA: {outcomes}; {len(names)} modules changed; mean KL to the original model on the probe "
        f"{record['summary']['kl_to_original']:.3g}; adapter, {PROFILE_JSON} and {PROFILE_PNG} in {output} "
        f"({time.perf_counter() - started:.1f} s)")
