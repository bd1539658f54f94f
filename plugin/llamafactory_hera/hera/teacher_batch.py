"""Teacher features of many images: batched forwards with decoding and preprocessing in background threads.

Used by head selection (calibration pairs) and by the pre-training pass that fills the teacher
feature cache (``hera_teacher_precompute``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from llamafactory_hera.hera.host_output import progress_file
from llamafactory_hera.hera.teacher import VisionTeacher, open_image


def prefetch_workers(device: torch.device) -> int:
    """Threads that decode and preprocess images ahead of the teacher's forward.

    0 when the teacher runs on the CPU: there the forward already uses every core and background
    preprocessing only competes with it (bench/selection.py, 2 cores: 0.46 s serial, 0.60 s with one
    worker for 512 images). On an accelerator: half the CPUs, 1 to 8.
    """
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


def teacher_batch_size(batch_size: int) -> int:
    """The teacher's batch: 4x the LM's (at least 32); a ViT on single images has short sequences and gains from
    wider GEMMs (measured with bench/selection.py)."""
    return max(32, 4 * batch_size)


def batches_of(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``items`` of ``size`` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def image_features(teacher: VisionTeacher, image_processor: Any, images: list[Any], batch_size: int,
                   workers: int | None = None, progress: bool = True, desc: str = "teacher features",
                   opener: Callable[[Any], Any] = open_image) -> torch.Tensor:
    """``[N, E]`` float32 teacher features of ``images`` (LLaMA-Factory image entries), in order, on the teacher's
    device. With ``workers > 0`` (default: :func:`prefetch_workers`) decoding (``opener``) and preprocessing run in
    background threads (PIL and torchvision release the GIL) up to ``workers + 1`` batches ahead, overlapping the
    teacher's forward on an accelerator."""
    def pixels(batch: list[Any]) -> torch.Tensor:
        return image_processor([opener(image) for image in batch], return_tensors="pt")["pixel_values"]

    batches = list(batches_of(images, batch_size))
    if workers is None:
        workers = prefetch_workers(next(teacher.parameters()).device)
    chunks = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hera-teacher-images") as pool:
        pending = deque(pool.submit(pixels, b) for b in batches[:workers + 1] if workers)
        for index in tqdm(range(len(batches)), desc=desc, disable=not progress, file=progress_file()):
            if workers:
                batch_pixels = pending.popleft().result()
                if index + workers + 1 < len(batches):
                    pending.append(pool.submit(pixels, batches[index + workers + 1]))
            else:
                batch_pixels = pixels(batches[index])
            chunks.append(teacher(batch_pixels))
    if not chunks:
        param = next(teacher.parameters())
        return torch.zeros(0, int(teacher.encoder.config.hidden_size), dtype=torch.float32, device=param.device)
    return torch.cat(chunks)
