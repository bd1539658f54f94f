"""Calibration data for head selection: image–caption pairs, pooled ``o_proj`` inputs of every head, teacher features.

Modes (paper §3.3):
- ``text``: the caption alone goes through the language model (the paper's choice); a head's
  representation pools over the caption tokens (special tokens excluded).
- ``multimodal``: image + caption through the MLLM, built by LLaMA-Factory's template and collator
  exactly as in training; pooling over the answer tokens (``labels != -100``).
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import IGNORE_INDEX, pooling_weights
from ..projection import effective_weight_columns, find_o_proj_modules, text_decoder
from ..teacher import VisionTeacher, open_image, per_sample_features


@dataclass(frozen=True)
class CalibrationPair:
    """One image–caption pair: row index in the dataset, caption text, image entries."""

    row: int
    caption: str
    images: tuple[Any, ...]


def usable_pairs(rows: Iterable[dict[str, Any]]) -> list[CalibrationPair]:
    """Rows with at least one image and a non-empty answer (LLaMA-Factory's aligned format)."""
    pairs = []
    for index, row in enumerate(rows):
        images = tuple(row.get("_images") or ())
        response = row.get("_response") or []
        caption = str(response[0].get("content", "")).strip() if response else ""
        if images and caption:
            pairs.append(CalibrationPair(index, caption, images))
    return pairs


def sample_pairs(pairs: list[CalibrationPair], num_samples: int, seed: int, k: int,
                 source: str) -> list[CalibrationPair]:
    """Up to ``num_samples`` pairs drawn without replacement with ``seed`` (kept in dataset order).

    Raises:
        ValueError: when fewer than ``k + 1`` usable pairs exist (kNN needs k other samples).
    """
    if len(pairs) < k + 1:
        raise ValueError(
            f"dataset {source}: only {len(pairs)} usable image-caption pairs (rows with an image and a non-empty "
            f"answer); scoring heads with k={k} needs at least {k + 1}. Add data or lower k (hera_k / --k)."
        )
    if len(pairs) <= num_samples:
        return list(pairs)
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), num_samples))
    return [pairs[i] for i in chosen]


class PooledInputRecorder:
    """Hooks on every layer's ``o_proj`` that pool its input ``[B, T, H*d_head]`` with per-sample weights.

    Pooling happens inside the hook (inference only), so memory is ``[B, H*d_head]`` per layer and batch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.o_projs = find_o_proj_modules(model)
        self.weights: torch.Tensor | None = None
        self.batches: list[list[torch.Tensor]] = [[] for _ in self.o_projs]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.o_projs)]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if self.weights is None or x.shape[:2] != self.weights.shape:
                raise RuntimeError(f"o_proj input of layer {layer} has shape {tuple(x.shape)}, pooling mask "
                                   f"{None if self.weights is None else tuple(self.weights.shape)}")
            pooled = torch.einsum("bt,btc->bc", self.weights.to(x.device), x.float())
            self.batches[layer].append(pooled.cpu())

        return hook

    def result(self) -> list[torch.Tensor]:
        """Per layer ``[N, H*d_head]`` float32 on CPU, in the order samples were fed."""
        return [torch.cat(chunks) for chunks in self.batches]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def collect_text(model: nn.Module, tokenizer: Any, pairs: list[CalibrationPair], batch_size: int, device: Any,
                 progress: bool = True) -> list[torch.Tensor]:
    """Pooled ``o_proj`` inputs with the captions alone through the text decoder.

    Returns:
        Per layer ``[N, H*d_head]`` float32 (CPU).
    """
    decoder = text_decoder(model)
    recorder = PooledInputRecorder(model)
    try:
        batches = list(_batches(pairs, batch_size))
        for batch in tqdm(batches, desc="heads (captions through the LM)", disable=not progress):
            encoded = tokenizer([p.caption for p in batch], padding=True, return_tensors="pt",
                                return_special_tokens_mask=True)
            mask = encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()
            recorder.weights = pooling_weights(mask).to(device)
            decoder(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device))
        return recorder.result()
    finally:
        recorder.remove()


@torch.inference_mode()
def collect_multimodal(model: nn.Module, dataset: Any, collator: Any, rows: list[int], batch_size: int, device: Any,
                       progress: bool = True) -> list[torch.Tensor]:
    """Pooled ``o_proj`` inputs with image + caption through the MLLM, batches built by the SFT collator.

    Returns:
        Per layer ``[N, H*d_head]`` float32 (CPU).
    """
    recorder = PooledInputRecorder(model)
    try:
        for batch_rows in tqdm(list(_batches(rows, batch_size)), desc="heads (image + caption through the MLLM)",
                               disable=not progress):
            features = [dict(dataset[i]) for i in batch_rows]
            batch = collator(features)
            labels = batch.pop("labels")
            recorder.weights = pooling_weights(labels != IGNORE_INDEX).to(device)
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return recorder.result()
    finally:
        recorder.remove()


def _teacher_pixels(image_processor: Any, batch: list[CalibrationPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Open and preprocess one batch: ``[N_img, 3, H, W]`` pixels and ``[B]`` images per pair."""
    images = [open_image(img) for pair in batch for img in pair.images]
    counts = torch.tensor([len(pair.images) for pair in batch])
    return image_processor(images, return_tensors="pt")["pixel_values"], counts


def prefetch_workers(device: torch.device) -> int:
    """Threads that decode and preprocess teacher images ahead of the teacher's forward.

    0 when the teacher runs on the CPU: there the forward already uses every core and background
    preprocessing only competes with it (bench/selection.py, 2 cores: 0.46 s serial, 0.60 s with one
    worker for 512 images). On an accelerator: half the CPUs, 1 to 8.
    """
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


@torch.no_grad()
def collect_teacher(teacher: VisionTeacher, image_processor: Any, pairs: list[CalibrationPair], batch_size: int,
                    progress: bool = True, workers: int | None = None) -> torch.Tensor:
    """``[N, E]`` float32 teacher features (mean over each pair's images), on the teacher's device.

    With ``workers > 0`` (default: :func:`prefetch_workers`), image decoding and preprocessing run in
    background threads (PIL and torchvision release the GIL) up to ``workers + 1`` batches ahead, so
    they overlap the teacher's forward on the accelerator.
    """
    batches = list(_batches(pairs, batch_size))
    if workers is None:
        workers = prefetch_workers(next(teacher.parameters()).device)
    chunks = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hera-teacher-images") as pool:
        pending = deque(pool.submit(_teacher_pixels, image_processor, b) for b in batches[:workers + 1] if workers)
        for index in tqdm(range(len(batches)), desc="teacher features", disable=not progress):
            if workers:
                pixels, counts = pending.popleft().result()
                if index + workers + 1 < len(batches):
                    pending.append(pool.submit(_teacher_pixels, image_processor, batches[index + workers + 1]))
            else:
                pixels, counts = _teacher_pixels(image_processor, batches[index])
            feats = teacher(pixels)
            chunks.append(per_sample_features(feats, counts.to(feats.device)))
    return torch.cat(chunks)


def layer_weights(model: nn.Module) -> list[torch.Tensor]:
    """Per layer the effective ``o_proj`` weight ``[d, H*d_head]`` (LoRA delta included), detached."""
    weights = []
    for o_proj in find_o_proj_modules(model):
        base = getattr(o_proj, "base_layer", o_proj)
        columns = torch.arange(base.weight.shape[1], device=base.weight.device)
        weights.append(effective_weight_columns(o_proj, columns).detach())
    return weights
