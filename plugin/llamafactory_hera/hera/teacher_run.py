"""The teacher inside a HeRA run: features before step 1, features in the steps, where it lives.

A plain object the trainer owns (:class:`RunTeacher`); it holds the frozen teacher and the run's feature cache.
"""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_hera.hera.teacher import load_image_processor, load_teacher, open_image, per_sample_features
from llamafactory_hera.hera.teacher_batch import teacher_batch_size
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.teacher_precompute import (
    precompute_teacher_features,
    precompute_wanted,
    teacher_bytes,
    training_images,
)


def _has_images(dataset: Any) -> bool:
    return dataset is not None and hasattr(dataset, "__len__") and "images" in (
        getattr(dataset, "column_names", None) or ())


class RunTeacher:
    """Teacher features for the HeRA term: precomputed before training, or computed per batch and cached."""

    def __init__(self, hera_args: Any, cache: TeacherFeatureCache | None, device: torch.device) -> None:
        self.hera_args = hera_args
        self.device = device  # where load_teacher puts it, and where it goes back after train()
        # float32 (teacher.TEACHER_DTYPE) whatever the model's dtype; precomputed, it leaves the GPU after its pass
        self.model = load_teacher(hera_args.hera_teacher, hera_args.hera_teacher_feature, device)
        self.cache = cache or TeacherFeatureCache(enabled=False)
        self.dim = int(self.model.encoder.config.hidden_size)
        self._precompute: bool | None = None

    def image_processor(self, collator: Any) -> Any:
        """The collator's teacher image processor (loaded when it has none)."""
        return getattr(collator, "hera_image_processor", None) or load_image_processor(self.hera_args.hera_teacher)

    def to(self, device: torch.device | str) -> bool:
        """Move the teacher to ``device``; True if it was elsewhere."""
        if next(self.model.parameters()).device == torch.device(device):
            return False
        self.model.to(device)
        return True

    def precompute_decision(self, dataset: Any, args: Any) -> bool:
        """Whether ``hera_teacher_precompute`` computes the features before step 1 in this run (decided once)."""
        if self._precompute is None:
            global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self._precompute = precompute_wanted(self.hera_args.hera_teacher_precompute, self.cache.enabled,
                                                 len(dataset) if _has_images(dataset) else None, args.max_steps,
                                                 global_batch)
        return self._precompute

    def precompute(self, dataset: Any, collator: Any, args: Any, main_process: bool) -> None:
        """``hera_teacher_precompute``: fill the feature cache with every training image's teacher feature, then
        move the teacher to the CPU when nothing is left for it to do in the steps."""
        if not self.precompute_decision(dataset, args):
            return
        if not _has_images(dataset) or not self.cache.enabled:
            print("[llamafactory-hera] hera_teacher_precompute: the training set has no readable `images` column "
                  "(streaming?) or the teacher cache is off; teacher features are computed in the steps.")
            return
        images = training_images(dataset["images"])
        stats = precompute_teacher_features(
            self.model, self.image_processor(collator), images, self.cache,
            teacher_batch_size(args.per_device_train_batch_size), getattr(collator, "_open", open_image),
            progress=main_process and not args.disable_tqdm)
        moved = ""
        if images.uncacheable == 0 and torch.device(args.device).type != "cpu":
            self.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            moved = f"; teacher moved off {args.device} ({teacher_bytes(self.model) / 2**30:.2f} GiB)"
        elif images.uncacheable:
            moved = f"; {images.uncacheable} in-memory images cannot be cached, so the teacher stays on {args.device}"
        if main_process:
            print(f"[llamafactory-hera] teacher features of {stats['images']} training images computed before the "
                  f"first step in {stats['seconds']:.1f} s ({stats['computed_here']} on this rank){moved}.")

    def features(self, pixel_values: torch.Tensor | None, pixel_keys: list[str] | None, keys: list[str | None],
                 counts: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[B, E]`` per-sample teacher features on ``device``: this batch's computed images by identity, the others
        cached (one host-to-device copy of the cached rows)."""
        if pixel_values is not None and self.to(self.device):
            print("[llamafactory-hera] an image missed by the precomputed teacher features: the teacher went back "
                  f"to {self.device} for the rest of the run.")
        computed = self.model(pixel_values) if pixel_values is not None else None
        image_features = self.cache.lookup(keys, computed, pixel_keys, device)
        return per_sample_features(image_features, counts.to(device), num_images=len(keys))
