"""What can be decided about a HeRA run before its first step: contrastive set sizes, the queue, image rows, the
same heads on every rank. A run that cannot form a loss with a negative (a set of fewer than 3 samples) or has no
image would train plain SFT while looking like HeRA: these checks stop it, naming the setting and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llamafactory_hera.hera.args import AUTO, HeraArguments
from llamafactory_hera.short_errors import RecipeError


@dataclass(frozen=True)
class ContrastiveGeometry:
    """Largest contrastive set a run can form, from the configured batch geometry.

    ``batch_set``: image samples one step can contribute (per-device batch, times the data-parallel
    processes when ``hera_gather`` gathers them); ``queue``: the feature queue's capacity.
    """

    per_device: int
    processes: int
    gather: bool
    batch_set: int
    queue: int
    queue_reason: str

    @property
    def largest(self) -> int:
        return self.batch_set + self.queue


def contrastive_geometry(hera_args: HeraArguments, per_device: int, processes: int) -> ContrastiveGeometry:
    """The run's contrastive geometry; under ``hera_queue_size: auto`` the queue is decided here, once.

    Auto switches a queue of ``4 * (hera_k + 1)`` samples on when the largest batch set is smaller than
    ``hera_k + 1``, or than 3 (a set of 2 has no negative, whatever k; ``hera_k: 1`` with batches of 2 would
    otherwise be refused with advice it already follows). One ragged last batch of an epoch does not switch it on.
    """
    gather = hera_args.hera_gather
    gathered = processes if gather and processes > 1 else 1
    batch_set = per_device * gathered
    smallest_useful = max(hera_args.hera_k + 1, 3)
    needed = batch_set < smallest_useful
    auto = hera_args.hera_queue_size == AUTO
    queue = (4 * (hera_args.hera_k + 1) if needed else 0) if auto else int(hera_args.hera_queue_size)
    where = f"per_device_train_batch_size {per_device} x {gathered} process(es)"
    if auto:
        reason = (f"auto: contrastive sets of at most {batch_set} image samples ({where}) are smaller than "
                  f"{smallest_useful} (hera_k+1, and at least 3 for a negative)" if needed else
                  f"auto: off, the contrastive set holds up to {batch_set} image samples ({where})")
    else:
        reason = f"hera_queue_size: {queue}"
    return ContrastiveGeometry(per_device, processes, gather, batch_set, queue, reason)


def check_contrastive_geometry(geometry: ContrastiveGeometry, hera_args: HeraArguments) -> None:
    """Refuse a run none of whose contrastive sets can ever hold a negative."""
    if geometry.largest >= 3:
        return
    setting = (f"per_device_train_batch_size: {geometry.per_device} on {geometry.processes} process(es)"
               f"{'' if geometry.gather or geometry.processes == 1 else ' with hera_gather: false'} and "
               f"hera_queue_size: {hera_args.hera_queue_size}")
    if geometry.largest < 2:
        what = "can never hold 2 image samples, so no HeRA loss can be formed and the run would be plain SFT"
    else:
        what = ("hold at most 2 image samples: the only other sample is the positive, there is no negative, and "
                "hera_loss would be exactly 0 every step")
    raise RecipeError(f"stage: hera: with {setting}, the contrastive sets {what}. Raise per_device_train_batch_size "
                      f"(at least {max(hera_args.hera_k + 1, 3)} is best), or set hera_queue_size: auto (or a "
                      "number >= 2) to add recent samples from a queue.")


def check_same_heads_on_every_rank(heads: list[str]) -> None:
    """Raise unless every data-parallel rank aligns the same heads (once, at trainer start)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, heads)
    if any(other != heads for other in gathered):
        raise RecipeError(f"hera_heads differ across ranks: {gathered}; every rank must align the same heads")


@dataclass(frozen=True)
class ImageRowCounts:
    """Rows of the training data by what they hold."""

    rows: int
    image_rows: int
    video_only_rows: int

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
    return ImageRowCounts(len(dataset), image_rows, video_only)


def check_image_rows(counts: ImageRowCounts | None, datasets: Any) -> None:
    """Refuse training data without any image."""
    if counts is None or counts.image_rows > 0:
        return
    videos = (f" ({counts.video_only_rows} rows have only videos, which have no teacher feature)"
              if counts.video_only_rows else "")
    raise RecipeError(f"dataset: {datasets} has no image in any of its {counts.rows} rows{videos}; stage: hera aligns "
                      "heads to the teacher's image neighbourhoods and would train plain SFT. Add image-text rows "
                      "(sharegpt `images` column, registered in dataset_info.json) or use stage: sft.")
