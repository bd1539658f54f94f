"""Teacher features of every training image before the first step, then the teacher off the accelerator.

With ``hera_teacher_precompute`` the feature cache is filled by one pass over the training set's
distinct images (split over the data-parallel ranks and all-gathered), so the training steps run no
teacher forward and the teacher's weights (DINOv2-L: 1.2 GB in float32) can leave the GPU for the whole
run. The features are those the steps would compute: same teacher, dtype and preprocessing; float32 (what
:class:`~llamafactory_hera.hera.teacher.VisionTeacher` returns), also in the all-gather.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from llamafactory_hera.hera.loss import distributed
from llamafactory_hera.hera.teacher import VisionTeacher
from llamafactory_hera.hera.teacher_batch import image_features
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache, image_key

GATHER_ROWS = 4096  # rows per all-gather round: [4096, 1024] float32 is 16 MB per rank


def precompute_wanted(setting: str, cache_enabled: bool, num_samples: int | None, max_steps: int,
                      global_batch: int) -> bool:
    """Whether to precompute: ``true`` / ``false``, or under ``auto`` when the cache is on and the run sees every
    training sample at least once (no ``max_steps`` that ends it inside the first epoch)."""
    if setting != "auto":
        return setting == "true"
    if not cache_enabled or num_samples is None:
        return False
    return max_steps <= 0 or max_steps * global_batch >= num_samples


@dataclass
class TrainingImages:
    """Distinct image entries of a training set by cache key, and how many entries cannot be keyed."""

    by_key: dict[str, Any]
    uncacheable: int


def training_images(rows: Iterable[list[Any] | None]) -> TrainingImages:
    """Distinct images of the ``images`` column of LLaMA-Factory's processed training set."""
    by_key: dict[str, Any] = {}
    uncacheable = 0
    for images in rows:
        for image in images or ():
            key = image_key(image)
            if key is None:
                uncacheable += 1
            else:
                by_key.setdefault(key, image)
    return TrainingImages(by_key, uncacheable)


def _shard_and_gather(keys: list[str], compute: Callable[[list[str]], torch.Tensor],
                      cache: TeacherFeatureCache) -> int:
    """Compute ``keys[rank::world]`` here, all-gather every rank's rows, store all of them in ``cache``.

    Returns:
        The number of images this rank sent through the teacher.
    """
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed() else (0, 1)
    mine = keys[rank::world]
    local = compute(mine).float()  # [len(mine), E] float32 on the teacher's device
    if world == 1:
        for key, row in zip(mine, local, strict=True):
            cache.features[key] = row.to("cpu")
        return len(mine)
    backend = torch.distributed.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    per_rank = -(-len(keys) // world)
    padded = torch.zeros(per_rank, local.shape[-1], dtype=local.dtype, device=comm)
    padded[:len(mine)] = local.to(comm)
    for start in range(0, per_rank, GATHER_ROWS):
        piece = padded[start:start + GATHER_ROWS].contiguous()
        gathered = [torch.empty_like(piece) for _ in range(world)]
        torch.distributed.all_gather(gathered, piece)
        for source, block in enumerate(gathered):
            block = block.to("cpu")
            for offset in range(block.shape[0]):
                index = (start + offset) * world + source  # keys[source::world][start + offset]
                if index < len(keys):
                    cache.features[keys[index]] = block[offset].clone()
    return len(mine)


def precompute_teacher_features(teacher: VisionTeacher, image_processor: Any, images: TrainingImages,
                                cache: TeacherFeatureCache, batch_size: int, opener: Callable[[Any], Any],
                                progress: bool) -> dict[str, float]:
    """Fill ``cache`` with the teacher feature of every keyed training image (split over ranks).

    Every rank must call it with the same ``images`` (it is collective under ``torch.distributed``).

    Returns:
        ``{"images", "computed_here", "seconds"}``.
    """
    start = time.perf_counter()
    keys = sorted(images.by_key)

    def compute(chunk: list[str]) -> torch.Tensor:
        return image_features(teacher, image_processor, [images.by_key[k] for k in chunk], batch_size,
                              progress=progress, desc="teacher features (before training)", opener=opener)

    computed_here = _shard_and_gather(keys, compute, cache)
    return {"images": len(keys), "computed_here": computed_here, "seconds": time.perf_counter() - start}


def teacher_bytes(teacher: VisionTeacher) -> int:
    """Bytes of the teacher's parameters and buffers."""
    tensors = list(teacher.parameters()) + list(teacher.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
