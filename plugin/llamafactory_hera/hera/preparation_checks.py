"""HeRA's checks before the first step: a run that would be plain SFT looking like HeRA stops, naming setting and fix
(docs/hera.md, "Unsupported combinations").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import head_projections, trainable_upstream
from llamafactory_hera.heads.geometry import HeadRef
from llamafactory_hera.hera.config import AUTO, HeraArguments
from llamafactory_hera.recipe.dataset_info import describe_data, image_rows
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera_patches.data.media_warnings import media_warnings_held
from llamafactory_hera_patches.data.templates import image_placeholder
from llamafactory_hera_patches.tools.model_data import (
    RecipeArgs,
    holds_out_by_val_size,
    load_aligned_rows,
    training_rows,
)


@dataclass(frozen=True)
class ContrastiveGeometry:
    """The largest contrastive set: ``batch_set`` (a step's image samples; times the processes under
    ``hera_gather``) plus ``queue`` (its capacity)."""

    per_device: int
    processes: int
    gather: bool
    batch_set: int
    queue: int
    queue_reason: str
    distinct_images: int | None = None  # in the training data (None: streaming, or not read yet)
    capped_from: int | None = None  # the queue asked for, when the distinct images capped it

    @property
    def largest(self) -> int:
        return self.batch_set + self.queue


def contrastive_geometry(
    hera_args: HeraArguments, per_device: int, processes: int, distinct_images: int | None = None
) -> ContrastiveGeometry:
    """The run's contrastive sets; any queue is capped at ``distinct_images`` minus a batch set (longer would repeat
    images)."""
    gather = hera_args.hera_gather
    gathered = processes if gather and processes > 1 else 1
    batch_set = per_device * gathered
    smallest_useful = max(hera_args.hera_k + 1, 3)
    needed = batch_set < smallest_useful
    auto = hera_args.hera_queue_size == AUTO
    queue = (4 * (hera_args.hera_k + 1) if needed else 0) if auto else int(hera_args.hera_queue_size)
    where = f"per_device_train_batch_size {per_device} x {gathered} process(es)"
    if auto:
        reason = (
            f"auto: contrastive sets of at most {batch_set} image samples ({where}) are smaller than "
            f"{smallest_useful} (hera_k+1, and at least 3 for a negative)"
            if needed
            else f"auto: off, the contrastive set holds up to {batch_set} image samples ({where})"
        )
    else:
        reason = f"hera_queue_size: {queue}"
    capped_from = None
    if distinct_images is not None and queue > max(0, distinct_images - batch_set):
        capped_from = queue
        queue = max(0, distinct_images - batch_set)
        reason += (
            f"; capped from {capped_from}: the training data has {distinct_images} distinct images, "
            f"{batch_set} of them in the batch set"
        )
    return ContrastiveGeometry(per_device, processes, gather, batch_set, queue, reason, distinct_images, capped_from)


def queue_cap_line(geometry: ContrastiveGeometry, hera_args: HeraArguments) -> str | None:
    if geometry.capped_from is None:
        return None
    return (
        f"note: hera_queue_size: {hera_args.hera_queue_size} gives a queue of {geometry.capped_from} samples, but "
        f"the training data has {geometry.distinct_images} distinct images and a batch set holds "
        f"{geometry.batch_set}: a longer queue than {geometry.queue} would hold the same images again. The queue "
        f"holds {geometry.queue} (set hera_queue_size: {geometry.queue} to say so in the recipe)."
    )


def check_contrastive_geometry(
    geometry: ContrastiveGeometry,
    hera_args: HeraArguments,
    data: str = "the training data",
    more: str = "another dataset, or a larger max_samples",
) -> None:
    """Refuse sets that can never hold ``hera_k + 1`` distinct images, or a negative."""
    k = hera_args.hera_k
    distinct = geometry.distinct_images
    needed = max(k + 1, 3)
    if distinct is not None and distinct < needed:
        fix = f"Lower hera_k to at most {distinct - 1}, or train" if distinct >= 3 else "Train"
        raise RecipeError(
            f"hera_k: {k}: a contrastive set needs {needed} distinct images (hera_k + 1: an anchor and its {k} teacher "
            f"neighbour{'s' if k != 1 else ''}; at least 3 for a negative), but {data} has {distinct} distinct "
            f"image{'s' if distinct != 1 else ''}, so no set can ever hold {needed} (a queue would only repeat them). "
            f"{fix} on more images ({more})."
        )
    setting = (
        f"per_device_train_batch_size: {geometry.per_device} on {geometry.processes} process(es)"
        f"{'' if geometry.gather or geometry.processes == 1 else ' with hera_gather: false'} and "
        f"hera_queue_size: {hera_args.hera_queue_size}"
    )
    if geometry.largest < 3:
        if geometry.largest < 2:
            what = "can never hold 2 image samples, so no HeRA loss can be formed and the run would be plain SFT"
        else:
            what = (
                "hold at most 2 image samples: the only other sample is the positive, there is no negative, and "
                "hera_loss would be exactly 0 every step"
            )
        raise RecipeError(
            f"stage: hera: with {setting}, the contrastive sets {what}. Raise "
            f"per_device_train_batch_size (at least {max(k + 1, 3)} is best), or set hera_queue_size: "
            "auto (or a number >= 2) to add recent samples from a queue."
        )
    if geometry.largest < k + 1:
        raise RecipeError(
            f"hera_k: {k}: each contrastive set needs hera_k + 1 = {k + 1} samples (an anchor and its {k} teacher "
            f"neighbours), but with {setting} a set holds at most {geometry.largest} ({geometry.batch_set} of a batch "
            f"set + {geometry.queue} queued). Raise per_device_train_batch_size to {k + 1}, set hera_queue_size: auto "
            f"(or at least {k + 1 - geometry.batch_set}), or lower hera_k to at most {geometry.largest - 1}."
        )


def check_same_heads_on_every_rank(heads: list[str]) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, heads)
    if any(other != heads for other in gathered):
        raise RecipeError(f"hera_heads differ across ranks: {gathered}; every rank must align the same heads")


@dataclass(frozen=True)
class ImageRowCounts:
    rows: int
    image_rows: int
    video_only_rows: int
    distinct_images: int | None = None  # rows sharing their images count once

    @property
    def text_only_rows(self) -> int:
        return self.rows - self.image_rows - self.video_only_rows


def count_image_rows(dataset: Any) -> ImageRowCounts | None:
    """Counts from LLaMA-Factory's aligned dataset (``_images`` / ``_videos`` columns); None if it cannot be read."""
    if dataset is None or not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        return None
    columns = dataset.column_names
    images = dataset["_images"] if "_images" in columns else [None] * len(dataset)
    videos = dataset["_videos"] if "_videos" in columns else [None] * len(dataset)
    image_rows = sum(1 for value in images if value)
    video_only = sum(1 for image, video in zip(images, videos, strict=True) if video and not image)
    distinct = {tuple(_image_identity(image, row) for image in value) for row, value in enumerate(images) if value}
    return ImageRowCounts(len(dataset), image_rows, video_only, len(distinct))


def _image_identity(image: Any, row: int) -> Any:
    """An image entry's path; an in-memory image is its row's own."""
    path = image.get("path") if isinstance(image, dict) else image
    return path if isinstance(path, str) else ("in-memory", row)


def check_image_rows(counts: ImageRowCounts | None, datasets: Any, which: str = "") -> None:
    """Refuse training data without images (``which``: said after "rows")."""
    if counts is None or counts.image_rows > 0:
        return
    videos = (
        f" ({counts.video_only_rows} rows have only videos, which have no teacher feature)"
        if counts.video_only_rows
        else ""
    )
    raise RecipeError(
        f"dataset: {datasets} has no image in any of its {counts.rows} rows{which}{videos}; stage: hera "
        "aligns heads to the teacher's image neighbourhoods and would train plain SFT. Add image-text "
        "rows (sharegpt `images` column, registered in dataset_info.json) or use stage: sft."
    )


def trainable_layers(model: nn.Module) -> list[int]:
    """Decoder layers whose ``o_proj`` trains or is fed by a trainable parameter."""
    o_projs = head_projections(model)
    fed = trainable_upstream(model, list(o_projs))
    return [
        layer for layer, o_proj in o_projs.items() if fed[layer] or any(p.requires_grad for p in o_proj.parameters())
    ]


def check_heads_train(model: nn.Module, heads: list[HeadRef], auto: bool, finetuning_args: Any = None) -> None:
    """Refuse heads no trainable parameter can move, naming them and the fix."""
    layers = trainable_layers(model)
    stuck = [ref for ref in heads if ref.layer not in layers]
    if not stuck:
        return

    def listed(refs: list[HeadRef]) -> str:
        return "[" + ", ".join(str(ref) for ref in refs) + "]"

    finetuning = getattr(finetuning_args, "finetuning_type", None)
    how = {
        "freeze": "raise freeze_trainable_layers to cover them (a negative value, e.g. -N, trains the first N "
        "layers; a positive N the last N)",
        "lora": "add those layers' o_proj to lora_target (or use lora_target: all)",
    }.get(str(finetuning), "unfreeze those layers (freeze_language_model: false)")
    where = f"layers {layers}" if layers else "no layer (nothing in or before the language model trains)"
    which = (
        f"hera_heads: auto selected {listed(heads)}; {listed(stuck)} of them"
        if auto
        else f"hera_heads: {listed(stuck)}"
    )
    choose = "list heads of those layers in hera_heads" if auto else "choose heads there"
    raise RecipeError(
        f"{which} cannot train under this recipe (finetuning_type: {finetuning}): their layer's o_proj is frozen and "
        f"no trainable parameter feeds its input, so HeRA would move only the temperature. The recipe trains heads in "
        f"{where}: {how}, or {choose}."
    )


def checked_image_rows(
    model_args: Any, data_args: Any, finetuning_args: Any, training_args: Any
) -> tuple[dict[str, int], Any, Any]:
    """(image path -> row, training-row counts, aligned rows), after checking the image files exist (else
    LLaMA-Factory fails with a bare OSError) and training rows have images; None when streaming."""
    if getattr(data_args, "streaming", False):
        return {}, None, None

    # main process first, as LLaMA-Factory loads a dataset: the others read its datasets cache
    local = not getattr(data_args, "data_shared_file_system", False)
    main = (training_args.local_process_index if local else training_args.process_index) == 0
    with (
        training_args.main_process_first(desc="align the dataset and check its images", local=local),
        media_warnings_held(),
    ):  # a missing file is named alone, not below a converter line per image
        recipe = RecipeArgs(model_args, data_args, finetuning_args)
        aligned = load_aligned_rows(recipe, training_args.seed, training_args=training_args)
        counts = count_image_rows(training_rows(recipe, training_args.seed, aligned))
        check_image_rows(
            counts,
            data_args.dataset,
            f" that train (val_size: {data_args.val_size} holds the others out)"
            if holds_out_by_val_size(data_args)
            else "",
        )
        return (
            image_rows(
                aligned,
                column="_images",
                check_files=main,
                placeholder=image_placeholder(),
                data=describe_data(data_args),
            ),
            counts,
            aligned,
        )


def checked_contrastive_geometry(
    hera_args: HeraArguments, counts: Any, data_args: Any, training_args: Any
) -> ContrastiveGeometry:
    """The run's contrastive sets, checked; says when the distinct images cap the queue."""
    geometry = contrastive_geometry(
        hera_args,
        training_args.per_device_train_batch_size,
        training_args.world_size,
        None if counts is None else counts.distinct_images,
    )
    if counts is None:  # streaming: sizes were checked before loading (hera/parsed_checks.py)
        return geometry
    names = ", ".join(data_args.dataset) if isinstance(data_args.dataset, list) else data_args.dataset
    limit = f", max_samples: {data_args.max_samples}" if data_args.max_samples is not None else ""
    more = "another dataset, or a larger max_samples"
    if holds_out_by_val_size(data_args):  # its validation rows do not train
        limit += f", without val_size: {data_args.val_size}'s validation rows"
        more = "another dataset, a larger max_samples, or a smaller val_size"
    check_contrastive_geometry(geometry, hera_args, f"the training data (dataset: {names}{limit})", more)
    line = queue_cap_line(geometry, hera_args)
    if line and training_args.process_index == 0:
        say(line)
    return geometry
