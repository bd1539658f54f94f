"""Per-image cache of teacher features, so epochs after the first pay no teacher forward.

Keys identify an image's content cheaply: a file path with its size and modification time, or a
hash of raw bytes; in-memory PIL images have no key and are never cached. The collator (possibly
in forked dataloader workers) skips preprocessing of images whose key it sees in the cache; the
trainer, in the training process, owns the features. Workers forked at an epoch start see the
keys cached before it; a worker that does not know a key merely preprocesses an image for nothing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch


def image_key(image: Any) -> str | None:
    """Content key of one LLaMA-Factory image entry, or None when it cannot be keyed (PIL objects)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    if isinstance(image, str | os.PathLike):
        path = os.path.abspath(os.fspath(image))
        try:
            stat = os.stat(path)
        except OSError:
            return None  # the collator's open_image reports the missing file
        return f"path:{path}|{stat.st_size}|{stat.st_mtime_ns}"
    return None


class TeacherFeatureCache:
    """Features ``[E]`` by image key, kept on the CPU in the teacher's dtype."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.features: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str | None) -> bool:
        return self.enabled and key is not None and key in self.features

    def lookup(self, keys: list[str | None], computed: torch.Tensor | None) -> torch.Tensor:
        """Features of all ``keys`` in order: cached rows from the cache, the others from ``computed``.

        Args:
            keys: one key per image of the batch (None: not cacheable).
            computed: ``[M, E]`` teacher features of the images that were not cached, in order.

        Returns:
            ``[len(keys), E]`` on ``computed``'s device (or the CPU when every image was cached).
        """
        rows: list[torch.Tensor] = []
        fresh = iter(computed if computed is not None else ())
        device = computed.device if computed is not None else torch.device("cpu")
        for key in keys:
            if key in self:
                rows.append(self.features[key].to(device, non_blocking=True))
                self.hits += 1
            else:
                row = next(fresh)
                rows.append(row)
                self.misses += 1
                if self.enabled and key is not None:
                    self.features[key] = row.detach().to("cpu")
        return torch.stack(rows)
