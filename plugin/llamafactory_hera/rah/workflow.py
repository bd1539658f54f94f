"""A ``stage: rah`` run in place of ``run_sft``: calibrate the recipe's model on its unlabelled image-text rows, no
optimizer step, and write to ``output_dir`` a PEFT LoRA adapter, ``rah_profile.json`` and ``rah_profile.png``
(docs/rah.md).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from llamafactory_hera.heads.architecture import layer_list
from llamafactory_hera.placement import check_model_structure, device_map_for
from llamafactory_hera.plots.heads import plot_score_panels
from llamafactory_hera.rah.adapter import lora_factors, save_adapter
from llamafactory_hera.rah.calibrate import calibrate
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.rah.plan import plan_calibration
from llamafactory_hera.rah.probe import token_kinds
from llamafactory_hera.recipe.dataset_info import describe_data, image_rows
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import progress, say, start_board_files
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.run_record import write_record
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera_patches.data.media_warnings import media_warnings_held
from llamafactory_hera_patches.data.templates import image_placeholder
from llamafactory_hera_patches.guard import recorded_versions
from llamafactory_hera_patches.tools.model_data import (
    RecipeArgs,
    load_aligned_rows,
    load_model_for_scoring,
    multimodal_dataset_and_collator,
)

PROFILE_JSON = "rah_profile.json"
PROFILE_PNG = "rah_profile.png"
RECORD_VERSION = 2  # 2: anchors from adjacent layers, outcome "unchanged", map layouts


def _table(values: Any, layers: list[int]) -> dict[str, list[float]]:
    return {f"L{layer}": [round(float(v), 6) for v in row] for layer, row in zip(layers, values, strict=True)}


def reported_kl(kl: float | None) -> float | None:
    """KL >= 0, so float32 noise below 0 (e.g. -2e-8) is reported as 0."""
    return None if kl is None else max(0.0, float(kl))


def profile_record(
    calibration: Any, args: RahArguments, identity: dict[str, Any], versions: dict[str, str], duration: dict[str, float]
) -> dict[str, Any]:
    """JSON-ready record of a :class:`~llamafactory_hera.rah.calibrate.Calibration`; ``settings``: the ``rah_*``
    values unprefixed, on the calibrated layers, with ``w_o = 1 - w_v``."""
    targets = []
    for update in calibration.updates:
        region = update.region
        targets.append(
            {
                "head": f"L{update.layer}H{update.head}",
                "anchors": [
                    {"head": f"L{layer}H{head}", "similarity": round(score, 6)} for layer, head, score in update.anchors
                ],
                "anchor_distance": update.anchor_distance,
                "alpha": region.alpha if region else 0.0,
                "kl": reported_kl(region.kl) if region else None,
                "tried": [{"alpha": a, "kl": reported_kl(kl)} for a, kl in region.tried] if region else [],
                "outcome": update.outcome,
                "modules": list(calibration.modules),
            }
        )

    def count(outcome: str) -> int:
        return sum(1 for t in targets if t["outcome"] == outcome)

    return {
        "record_version": RECORD_VERSION,
        "stage": "rah",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": calibration.layers,
        "isal": _table(calibration.isal, calibration.layers),
        "isal_standardised": _table(calibration.isal_std, calibration.layers),
        "caf": _table(calibration.caf, calibration.layers),
        "targets": targets,
        "summary": {
            "targets": len(targets),
            "calibrated": count("calibrated"),
            "rolled_back": count("rolled back"),
            "without_anchor": count("no anchor"),
            "unchanged_in_model_dtype": count("unchanged"),
            "anchors_from_adjacent_layers": sum(1 for u in calibration.updates if u.anchor_distance),
            "kl_to_original": reported_kl(calibration.kl_to_original),
            "samples_scored_on_one_half": calibration.one_sided_samples,
            "samples_without_a_map": calibration.maps_skipped,
            "map_layouts": calibration.map_layouts,
        },
        "settings": {
            **{key.removeprefix("rah_"): value for key, value in asdict(args).items()},
            "layers": list(calibration.layers),
            "w_o": 1.0 - args.rah_w_v,
        },
        "identity": identity,
        "versions": versions,
        "duration": duration,
    }


def plot_profile(calibration: Any, path: Path, model_name: str) -> Path:
    """Standardised I-SAL and CAF heatmaps, calibrated targets boxed red, other targets black; the title names the run
    (``path``'s folder)."""
    calibrated = [(u.layer, u.head) for u in calibration.updates if u.calibrated]
    others = [(u.layer, u.head) for u in calibration.updates if (u.layer, u.head) not in calibrated]
    title = (
        f"{Path(path).parent.name} (stage: rah): head profile of {Path(model_name).name}, {len(calibrated)} of "
        f"{len(calibrated) + len(others)} targets calibrated"
    )
    return plot_score_panels(
        [(calibration.isal_std.numpy(), "I-SAL (standardised)"), (calibration.caf.numpy(), "CAF")],
        calibration.layers,
        calibrated,
        others,
        path,
        title,
        box_labels=("calibrated targets", "other targets (rolled back, unchanged or without anchors)"),
    )


def _image_rows(aligned: Any, datasets: list[str], rah_args: RahArguments, seed: int) -> list[int]:
    """Image rows shuffled by ``seed``, at most ``rah_samples``; errors name the fix."""
    rows = [index for index, images in enumerate(aligned["_images"]) if images]
    needed = max(rah_args.rah_probe_samples, rah_args.rah_kl_samples)
    if not rows:
        raise RecipeError(
            f"dataset: {datasets} has no image in any of its {len(aligned)} rows; RAH-LoRA calibrates "
            "heads by their attention between text and image tokens. Use image-text rows."
        )
    if len(rows) < needed:
        raise RecipeError(
            f"dataset: {datasets} has {len(rows)} image rows, fewer than the {needed} the probes need "
            "(rah_probe_samples / rah_kl_samples). Add rows or lower those keys."
        )
    random.Random(seed).shuffle(rows)
    if len(rows) < rah_args.rah_samples:
        say(
            f"warning: {len(rows)} image rows, fewer than rah_samples: {rah_args.rah_samples}; calibrating on "
            f"{len(rows)}."
        )
    return rows[: rah_args.rah_samples]


def _say_what_was_left_out(calibration: Any, rows: int) -> None:
    """Console lines the JSON alone would hide: rows without a map or scored on one I-SAL half, several layouts."""
    if calibration.one_sided_samples:
        say(
            f"warning: {calibration.one_sided_samples} of {rows} rows have no text before their image (the attention "
            "sink apart): their I-SAL is the text->image half alone."
        )
    if calibration.maps_skipped:
        say(
            f"warning: {calibration.maps_skipped} of {rows} rows have no text after their image and give no "
            "text->image map (the attention similarity uses the others)."
        )
    if calibration.map_layouts > 1:
        say(
            f"RAH-LoRA: the rows' images come in {calibration.map_layouts} layouts (grids of image tokens); the "
            "attention similarity averages the per-layout map cosines, weighted by rows (no row is left out)."
        )


def _outcomes(calibration: Any, summary: dict[str, Any]) -> str:
    """``"2 of 5 targets calibrated, 1 rolled back, ..."`` (non-zero parts)."""
    parts = [f"{summary['calibrated']} of {summary['targets']} targets calibrated"]
    for key, words in (
        ("rolled_back", "rolled back"),
        ("without_anchor", "without anchors"),
        ("unchanged_in_model_dtype", f"unchanged (the step rounds to nothing in {calibration.dtype})"),
    ):
        if summary[key]:
            parts.append(f"{summary[key]} {words}")
    if summary["anchors_from_adjacent_layers"]:
        parts.append(f"{summary['anchors_from_adjacent_layers']} with anchors from adjacent layers (none in their own)")
    return ", ".join(parts)


def placement(model_args: Any, device: str) -> dict[str, Any] | None:
    """The calibration's ``device_map`` (:mod:`llamafactory_hera.placement`: whole on ``device`` where it fits, else
    over every visible GPU, then CPU RAM), said in one line; None: whole on ``device``. A bitsandbytes model loads as
    LLaMA-Factory loads it, whole on the process's GPU (70B in 4-bit: about 40 GB)."""
    meta = check_model_structure(model_args.model_name_or_path, model_args.trust_remote_code)
    saved = getattr(getattr(meta, "config", None), "dtype", None) or "float32"
    dtype = str(model_args.compute_dtype or saved).removeprefix("torch.")  # as LLaMA-Factory loads it
    return (
        None
        if meta is None
        else device_map_for(
            meta,
            model_args.model_name_or_path,
            device,
            dtype,
            job="RAH-LoRA",
            bits=model_args.quantization_bit,
            double_quant=model_args.double_quantization,
        )
    )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where batches go: the input embeddings' compute device (accelerate's, for an offloaded one)."""
    embeddings = model.get_input_embeddings()
    return torch.device(getattr(getattr(embeddings, "_hf_hook", None), "execution_device", embeddings.weight.device))


@dataclass(frozen=True)
class RahPreparation:
    """Preparation -> calibration: start time, the recipe's model and data, the rows."""

    started: float
    recipe: RecipeArgs
    rows: list[int]


@dataclass(frozen=True)
class RahCalibrated:
    """Calibration -> finish: the model, its calibration and plan, when the model had loaded."""

    model: torch.nn.Module
    calibration: Any
    plan: Any
    loaded: float


def prepare(rah_args: RahArguments, parsed: HostArguments) -> RahPreparation:
    """The calibration rows, every image read, before the model loads."""
    started = time.perf_counter()
    start_board_files()
    data_args = parsed.data
    recipe = RecipeArgs(parsed.model, data_args, parsed.finetuning)
    with media_warnings_held():  # a missing file is named before the model loads, not in a line per image
        aligned = load_aligned_rows(recipe, parsed.training.seed)
        rows = _image_rows(aligned, data_args.dataset, rah_args, parsed.training.seed)
        image_rows(
            aligned,
            column="_images",
            only=rows,
            placeholder=image_placeholder(),
            decode=True,
            data=describe_data(data_args),
        )  # decoded: these few rows are read after the model loads
    return RahPreparation(started, recipe, rows)


def train(
    rah_args: RahArguments, host: Any, parsed: HostArguments, callbacks: Any, prepared: RahPreparation
) -> RahCalibrated:
    """Load the model as LLaMA-Factory does, place it (:func:`placement`) and calibrate it on the rows."""
    recipe = prepared.recipe
    rows = prepared.rows
    device = str(parsed.training.device)
    model, tokenizer_module, template = load_model_for_scoring(recipe, device, placement(parsed.model, device))
    keep_4bit_layout(model)  # 4-bit V and O weights are read dequantized (training/eval_forward.py)
    loaded = time.perf_counter()
    dataset, collator = multimodal_dataset_and_collator(
        recipe, model, tokenizer_module, template, parsed.training.seed, rows
    )
    first = input_device(model)
    size = rah_args.rah_batch_size

    def batches(count: int, size: int) -> list[dict[str, Any]]:  # rows 0..count - 1, size at a time, on ``first``
        return [
            {
                k: v.to(first) if isinstance(v, torch.Tensor) else v
                for k, v in collator([dataset[i] for i in range(j, min(j + size, count))]).items()
            }
            for j in range(0, count, size)
        ]

    calibration_batches = batches(len(rows), size)
    caf_batches = batches(rah_args.rah_probe_samples, 1)
    kl_batches = batches(rah_args.rah_kl_samples, size)
    plan = plan_calibration(model, rah_args)
    layers = plan.layers
    left = plan.left_out
    if left:  # never silently: a KV-shared layer's V update would do nothing, a linear-attention layer has no heads
        reasons = {why: [layer for layer in sorted(left) if left[layer] == why] for why in left.values()}
        say("RAH-LoRA: leaves out " + "; ".join(f"{layer_list(layers)} ({why})" for why, layers in reasons.items()))
    kinds = token_kinds(model, tokenizer_module["tokenizer"], tokenizer_module.get("processor"))
    say(
        f"RAH-LoRA: layers {layers[0]}..{layers[-1]} ({len(layers)}); {len(rows)} rows for I-SAL, "
        f"{rah_args.rah_probe_samples} for CAF, {rah_args.rah_kl_samples} for the KL probe; rank {rah_args.rah_rank}, "
        f"delta {rah_args.rah_delta}, alpha_max {rah_args.rah_alpha_max}; attention eager"
    )
    calibration = calibrate(model, calibration_batches, caf_batches, kl_batches, rah_args, kinds, progress, plan)
    _say_what_was_left_out(calibration, len(rows))
    return RahCalibrated(model, calibration, plan, loaded)


def finish(
    rah_args: RahArguments, host: Any, parsed: HostArguments, prepared: RahPreparation, calibrated: RahCalibrated
) -> None:
    """Write the profile record and figure, then the adapter, to ``output_dir``; refuse a calibration that changed no
    weight."""
    model_args, data_args, training_args, finetuning_args, _ = parsed
    calibration = calibrated.calibration
    model = calibrated.model
    rows = prepared.rows
    started = prepared.started
    loaded = calibrated.loaded
    output = Path(training_args.output_dir)
    factors = lora_factors(calibration, model, calibrated.plan.geometry)
    record = profile_record(
        calibration,
        rah_args,
        {
            "model_name_or_path": str(model_args.model_name_or_path),
            "dataset": list(data_args.dataset),
            "dataset_dir": str(data_args.dataset_dir),
            "template": str(data_args.template),
            "rows": rows,
            "seed": training_args.seed,
        },
        recorded_versions(),
        {
            "total_s": round(time.perf_counter() - started, 3),
            "without_model_loading_s": round(time.perf_counter() - loaded, 3),
        },
    )
    write_record(output / PROFILE_JSON, record)  # makes the folder
    plot_profile(calibration, output / PROFILE_PNG, str(model_args.model_name_or_path))
    outcomes = _outcomes(calibration, record["summary"])
    if not any(update.calibrated for update in calibration.updates):
        raise RecipeError(
            f"RAH-LoRA changed no weight: {outcomes}; no adapter was written. See "
            f"{output / PROFILE_JSON}; a looser rah_delta, a larger rah_alpha_max or other rah_layers "
            "may help."
        )
    names = save_adapter(
        model,
        factors,
        output,
        base_name=str(model_args.model_name_or_path),
        dora=bool(getattr(finetuning_args, "use_dora", False)),
        overlay=calibration.overlay,
    )
    say(
        f"RAH-LoRA: {outcomes}; {len(names)} modules changed; mean KL to the original model on the probe "
        f"{record['summary']['kl_to_original']:.3g}; adapter, {PROFILE_JSON} and {PROFILE_PNG} in {output} "
        f"({time.perf_counter() - started:.1f} s)"
    )
