"""The teacher's life cycle inside a HeRA run: features before step 1, features in the steps, where it lives.

Mixed into :class:`llamafactory_hera.hera.trainer.HeraTrainerMixin`; uses its ``hera_args``,
``hera_teacher``, ``hera_feature_cache`` and the Trainer's ``args`` / ``train_dataset`` / ``data_collator``.
"""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_hera.hera.teacher import load_image_processor, open_image, per_sample_features
from llamafactory_hera.hera.teacher_batch import teacher_batch_size
from llamafactory_hera.hera.teacher_precompute import (
    precompute_teacher_features,
    precompute_wanted,
    teacher_bytes,
    training_images,
)


class HeraTeacherMixin:
    """Teacher features for the HeRA term: precomputed before training, or computed per batch and cached."""

    hera_args: Any
    hera_teacher: Any
    hera_feature_cache: Any
    args: Any
    train_dataset: Any
    data_collator: Any

    def _hera_teacher_to(self, device: torch.device | str) -> bool:
        """Move the teacher to ``device``; True if it was elsewhere."""
        if next(self.hera_teacher.parameters()).device == torch.device(device):
            return False
        self.hera_teacher.to(device)
        return True

    def _hera_precompute_decision(self) -> bool:
        """Whether ``hera_teacher_precompute`` computes the features before step 1 in this run (decided once)."""
        decided = getattr(self, "_hera_precompute_decided", None)
        if decided is None:
            decided = self._hera_precompute_decided = self._hera_decide_precompute()
        return decided

    def _hera_decide_precompute(self) -> bool:
        dataset = self.train_dataset
        has_images = dataset is not None and hasattr(dataset, "__len__") and "images" in (
            getattr(dataset, "column_names", None) or ())
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return precompute_wanted(self.hera_args.hera_teacher_precompute, self.hera_feature_cache.enabled,
                                 len(dataset) if has_images else None, args.max_steps, global_batch)

    def _hera_precompute_teacher(self) -> None:
        """``hera_teacher_precompute``: fill the feature cache with every training image's teacher feature, then
        move the teacher to the CPU when nothing is left for it to do in the steps."""
        if not self._hera_precompute_decision():
            return
        dataset = self.train_dataset
        args = self.args
        has_images = dataset is not None and hasattr(dataset, "__len__") and "images" in (
            getattr(dataset, "column_names", None) or ())
        if not has_images or not self.hera_feature_cache.enabled:
            print("[llamafactory-hera] hera_teacher_precompute: the training set has no readable `images` column "
                  "(streaming?) or the teacher cache is off; teacher features are computed in the steps.")
            return
        images = training_images(dataset["images"])
        collator = self.data_collator
        stats = precompute_teacher_features(
            self.hera_teacher, getattr(collator, "hera_image_processor", None) or load_image_processor(
                self.hera_args.hera_teacher), images, self.hera_feature_cache,
            teacher_batch_size(args.per_device_train_batch_size), getattr(collator, "_open", open_image),
            progress=self.is_world_process_zero() and not args.disable_tqdm)
        moved = ""
        if images.uncacheable == 0 and torch.device(args.device).type != "cpu":
            self._hera_teacher_to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            moved = f"; teacher moved off {args.device} ({teacher_bytes(self.hera_teacher) / 2**30:.2f} GiB)"
        elif images.uncacheable:
            moved = f"; {images.uncacheable} in-memory images cannot be cached, so the teacher stays on {args.device}"
        if self.is_world_process_zero():
            print(f"[llamafactory-hera] teacher features of {stats['images']} training images computed before the "
                  f"first step in {stats['seconds']:.1f} s ({stats['computed_here']} on this rank){moved}.")

    def _hera_teacher_features(self, pixel_values: torch.Tensor | None, pixel_keys: list[str] | None,
                               keys: list[str | None], counts: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[B, E]`` per-sample teacher features on ``device``: this batch's computed images by identity, the others
        cached (one host-to-device copy of the cached rows)."""
        if pixel_values is not None and self._hera_teacher_to(self.args.device):
            print("[llamafactory-hera] an image missed by the precomputed teacher features: the teacher went back "
                  f"to {self.args.device} for the rest of the run.")
        computed = self.hera_teacher(pixel_values) if pixel_values is not None else None
        image_features = self.hera_feature_cache.lookup(keys, computed, pixel_keys, device)
        return per_sample_features(image_features, counts.to(device), num_images=len(keys))
