"""Collator mixin: adds the teacher's pixel values of each sample's raw images to the batch.

It reads the image entries before the host collator removes them, so the MLLM batch itself is
exactly what plain SFT produces. Keys added: ``hera_pixel_values`` ``[N_img, 3, h, w]`` and
``hera_image_counts`` ``[B]`` (int64, images per sample).
"""

from __future__ import annotations

from typing import Any

import torch

from .teacher import open_image

HERA_BATCH_KEYS = ("hera_pixel_values", "hera_image_counts")


class HeraCollatorMixin:
    """Mix in front of a LLaMA-Factory multimodal collator; set ``hera_image_processor`` on the class."""

    hera_image_processor: Any = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        images: list[Any] = []
        counts: list[int] = []
        for feature in features:
            sample_images = feature.get("images") or []
            counts.append(len(sample_images))
            images.extend(sample_images)
        batch = super().__call__(features)
        if images:
            pixels = self.hera_image_processor([open_image(img) for img in images], return_tensors="pt")
            batch["hera_pixel_values"] = pixels["pixel_values"]
        batch["hera_image_counts"] = torch.tensor(counts, dtype=torch.long)
        return batch
