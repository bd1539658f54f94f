"""Collator mixin adding the teacher's pixels of each sample's images (read before the host collator drops them).
Keys: ``hera_image_counts`` ``[B]``; ``hera_image_keys``: ``N_img`` cache keys; ``hera_pixel_values``
``[M, 3, h, w]``: the distinct uncached images; ``hera_pixel_keys``: their identities.

It also computes on the CPU what the step would otherwise sync for: ``hera_pooling_weights`` ``[B, T]``,
``hera_anchor_index`` ``[A]`` and ``hera_sample_counts`` ``[A, text-only samples, every sample one image]``.
"""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_hera.heads.pooling import pooled_token_mask, pooling_weights
from llamafactory_hera.hera.teacher import open_image
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache, image_identity, image_key
from llamafactory_hera.runtime.errors import RecipeError

HERA_BATCH_KEYS = (
    "hera_pixel_values",
    "hera_pixel_keys",
    "hera_image_counts",
    "hera_image_keys",
    "hera_pooling_weights",
    "hera_anchor_index",
    "hera_sample_counts",
)


def collator_token_sources(collator: Any) -> dict[str, Any]:
    """The SFT collator's processor, tokenizer and mm_plugin (for multimodal token ids)."""
    template = getattr(collator, "template", None)
    return {
        "processor": getattr(collator, "processor", None),
        "tokenizer": getattr(collator, "tokenizer", None),
        "mm_plugin": getattr(template, "mm_plugin", None),
    }


def describe_image(image: Any, rows: dict[str, int]) -> str:
    """``'path' (training dataset row N)`` for error messages."""
    path = image.get("path") if isinstance(image, dict) else image
    if isinstance(path, str):
        row = rows.get(path)
        return f"{path!r}" + (f" (training dataset row {row})" if row is not None else "")
    return f"an in-memory image of type {type(image).__name__}"


class HeraCollatorMixin:
    """Mix in front of a LLaMA-Factory multimodal collator; set ``hera_image_processor`` on the class."""

    hera_image_processor: Any = None
    hera_feature_cache: TeacherFeatureCache | None = None
    hera_image_rows: dict[str, int] | None = None  # image path -> dataset row, for error messages
    hera_multimodal_ids: frozenset[int] | None = None  # the model's placeholder tokens, set by the trainer
    hera_pooling: str = "assistant"

    def _open(self, image: Any) -> Any:
        try:
            return open_image(image)
        except Exception as err:  # noqa: BLE001 - any decoding failure becomes one clear message
            where = describe_image(image, self.hera_image_rows or {})
            raise RecipeError(f"HeRA cannot read {where} for the teacher: {type(err).__name__}: {err}") from None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if any(len(feature["labels"]) != len(feature["input_ids"]) for feature in features if "labels" in feature):
            # predict_with_generate's batches (the answer alone as labels): HeRA has no term there
            return super().__call__(features)
        images: list[Any] = []
        counts: list[int] = []
        for feature in features:
            sample_images = feature.get("images") or []
            counts.append(len(sample_images))
            images.extend(sample_images)
        cache = self.hera_feature_cache
        keys = [image_key(img) for img in images]
        # before the host collator, so an unreadable file is reported by name and row
        todo_ids: list[str] = []
        todo: list[Any] = []
        for position, (image, key) in enumerate(zip(images, keys, strict=True)):
            identity = image_identity(key, position)
            if identity in todo_ids or (cache is not None and key in cache):
                continue
            todo_ids.append(identity)
            todo.append(self._open(image))
        batch = super().__call__(features)
        if todo:
            batch["hera_pixel_values"] = self.hera_image_processor(todo, return_tensors="pt")["pixel_values"]
        batch["hera_pixel_keys"] = todo_ids
        batch["hera_image_keys"] = keys
        batch["hera_image_counts"] = torch.tensor(counts, dtype=torch.long)
        if self.hera_multimodal_ids is not None and "labels" in batch:  # the pooled tokens, anchors, sample counts
            mask = pooled_token_mask(
                batch["labels"],
                batch["input_ids"],
                batch.get("attention_mask"),
                self.hera_pooling,
                self.hera_multimodal_ids,
            )
            has_tokens = mask.any(-1).tolist()
            anchors = [i for i, (n, pooled) in enumerate(zip(counts, has_tokens, strict=True)) if n > 0 and pooled]
            batch["hera_pooling_weights"] = pooling_weights(mask)
            batch["hera_anchor_index"] = torch.tensor(anchors, dtype=torch.long)
            batch["hera_sample_counts"] = [len(anchors), counts.count(0), int(counts.count(1) == len(counts))]
        return batch
