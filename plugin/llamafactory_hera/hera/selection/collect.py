"""Calibration data for head selection: image–caption pairs, every head's pooled ``o_proj`` inputs, teacher features
(paper §3.3; docs/hera.md, "Choosing the heads").
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llamafactory_hera.heads.architecture import head_projections, text_decoder
from llamafactory_hera.heads.pooling import multimodal_token_ids, pooled_token_mask, pooling_weights
from llamafactory_hera.hera import teacher_cache
from llamafactory_hera.hera.projection import effective_weight_columns
from llamafactory_hera.hera.teacher import VisionTeacher, batches_of, continuing, image_features, per_sample_features
from llamafactory_hera.hera.teacher_cache import TeacherFeatureStore, stored_image_features
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import progress_file


@dataclass(frozen=True)
class CalibrationPair:
    row: int
    caption: str
    images: tuple[Any, ...]


def usable_pairs(rows: Iterable[dict[str, Any]]) -> list[CalibrationPair]:
    """Aligned rows with an image and a non-empty answer that SFT tokenization keeps."""
    pairs = []
    for index, row in enumerate(rows):
        images = tuple(row.get("_images") or ())
        response = row.get("_response") or []
        caption = str(response[0].get("content", "")).strip() if len(response) == 1 else ""
        if images and caption and len(row.get("_prompt") or []) % 2 == 1:
            pairs.append(CalibrationPair(index, caption, images))
    return pairs


def _image_identity(image: Any) -> str:
    """An image entry's resolved path or bytes' hash, for de-duplication."""
    if isinstance(image, dict):
        image = image.get("path") or image.get("bytes")
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    if isinstance(image, str):
        return "path:" + os.path.realpath(image)
    return f"object:{id(image)}"


def distinct_image_pairs(pairs: list[CalibrationPair], seed: int) -> list[CalibrationPair]:
    """One pair per distinct image set, drawn with ``seed``: rows sharing an image tie in the teacher's kNN."""
    groups: dict[tuple[str, ...], list[CalibrationPair]] = {}
    for pair in pairs:
        groups.setdefault(tuple(_image_identity(image) for image in pair.images), []).append(pair)
    rng = random.Random(seed)
    kept = [group[rng.randrange(len(group))] if len(group) > 1 else group[0] for group in groups.values()]
    return sorted(kept, key=lambda pair: pair.row)


def data_notes(usable: int, distinct: int, chosen: list[CalibrationPair], requested: int) -> dict[str, Any]:
    captions = [pair.caption for pair in chosen]
    repeated = len(captions) - len(set(captions))
    return {
        "usable_pairs": usable,
        "distinct_images": distinct,
        "rows_sharing_an_image_dropped": usable - distinct,
        "pairs_requested": requested,
        "pairs_used": len(chosen),
        "repeated_captions": repeated,
    }


def sample_pairs(
    pairs: list[CalibrationPair], num_samples: int, seed: int, k: int, source: str, usable_rows: int | None = None
) -> list[CalibrationPair]:
    """Up to ``num_samples`` pairs drawn with ``seed``, in dataset order; fewer than ``k + 1`` is a RecipeError."""
    if len(pairs) < k + 1:
        rows = usable_rows if usable_rows is not None else len(pairs)
        shared = "; rows that share an image count once" if rows > len(pairs) else ""
        raise RecipeError(
            f"dataset {source}: only {len(pairs)} usable image-caption pairs with distinct images, from {rows} "
            f"row(s) with an image and a non-empty answer{shared}; scoring heads with k={k} needs at least {k + 1}. "
            "Add data with other images or lower k (hera_k / --k)."
        )
    if len(pairs) <= num_samples:
        return list(pairs)
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), num_samples))
    return [pairs[i] for i in chosen]


class PooledInputRecorder:
    """Hooks pooling each head layer's ``o_proj`` input ``[B, T, H*d_head]`` to ``[B, H*d_head]`` float32; a
    ``folder`` keeps each batch's rows for a killed pass's rerun (:meth:`remaining`)."""

    def __init__(self, model: nn.Module, folder: Path | None = None) -> None:
        self.o_projs = head_projections(model)
        self.weights: torch.Tensor | None = None
        self.widths: list[int] = []
        self.batches: list[torch.Tensor] = []  # per batch [B, sum of widths], float32, CPU
        self.folder = folder
        while folder is not None:
            try:
                kept = torch.load(folder / f"{len(self.batches)}.pt", map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - absent or damaged: recomputed from here
                break
            self.batches.append(kept["rows"])
            self.widths = kept["widths"]
        self._pending: dict[int, torch.Tensor | None] = dict.fromkeys(self.o_projs)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in self.o_projs.items()]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if self.weights is None or x.shape[:2] != self.weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x.shape)}, pooling mask "
                    f"{None if self.weights is None else tuple(self.weights.shape)}"
                )
            if self._pending[layer] is not None:
                raise RuntimeError(f"o_proj of layer {layer} ran twice in one forward")
            with _without_autocast(x.device):  # the monitor runs in training's bf16 autocast
                self._pending[layer] = torch.einsum("bt,btc->bc", self.weights.to(x.device, torch.float32), x.float())

        return hook

    def flush(self) -> None:
        """After one forward: every layer's pooled rows copied to the host at once (each copy waits)."""
        missing = [layer for layer, pooled in self._pending.items() if pooled is None]
        if missing:
            raise RuntimeError(f"o_proj of layer(s) {missing} did not run in the forward")
        pending = [pooled for pooled in self._pending.values() if pooled is not None]
        # several GPUs: gather on the first
        pending = [pooled.to(pending[0].device) for pooled in pending]
        self.widths = [pooled.shape[-1] for pooled in pending]
        self.batches.append(torch.cat(pending, dim=-1).cpu())
        self._pending = dict.fromkeys(self.o_projs)
        if self.folder is not None:
            try:
                teacher_cache.save_durable(
                    {"rows": self.batches[-1], "widths": self.widths}, self.folder / f"{len(self.batches) - 1}.pt"
                )
            except (OSError, RuntimeError) as err:  # ENOSPC: RuntimeError; only the resume is lost
                teacher_cache.cache_unwritable(self.folder, err)
                self.folder = None
                return
            save_signal.stop_before_step(f"head selection's first {len(self.batches)} batches kept")

    def remaining(self, items: list[Any], batch_size: int, desc: str, progress: bool) -> Iterable[list[Any]]:
        """Batches of ``items`` less those read back from the folder (said), under a progress bar."""
        batches = list(batches_of(items, batch_size))
        continuing(sum(map(len, batches[: len(self.batches)])), sum(map(len, batches)), desc)
        return tqdm(batches[len(self.batches) :], desc=desc, disable=not progress, file=progress_file())

    def result(self) -> dict[int, torch.Tensor]:
        """Layer with heads -> ``[N, H*d_head]`` float32 on CPU, in feed order."""
        merged = torch.cat(self.batches)  # [N, sum of widths]
        return {
            layer: part.contiguous()
            for layer, part in zip(self.o_projs, merged.split(self.widths, dim=-1), strict=True)
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def collect_text(
    model: nn.Module,
    tokenizer: Any,
    pairs: list[CalibrationPair],
    batch_size: int,
    device: Any,
    progress: bool = True,
    kept: Path | None = None,
) -> dict[int, torch.Tensor]:
    """Layer with heads -> ``[N, H*d_head]`` float32 (CPU) pooled ``o_proj`` inputs, captions alone through the text
    decoder. ``no_grad``, not ``inference_mode``: the tests' simulated accelerator cannot make its tensors there."""
    decoder = text_decoder(model)
    recorder = PooledInputRecorder(model, kept)
    try:
        for batch in recorder.remaining(pairs, batch_size, "heads (captions through the LM)", progress):
            encoded = tokenizer(
                [p.caption for p in batch], padding=True, return_tensors="pt", return_special_tokens_mask=True
            )
            mask = encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()
            recorder.weights = pooling_weights(mask).to(device)
            through_root(
                model,
                decoder,
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
            )
            recorder.flush()
        return recorder.result()
    finally:
        recorder.remove()


def through_root(model: nn.Module, decoder: nn.Module, **inputs: Any) -> Any:
    """``decoder(**inputs)``; under FSDP2 through ``model``'s call with its ``forward`` set to the decoder's: FSDP2
    gathers the root's own parameters (embeddings, norm) only in the root's forward hooks."""
    if not (torch.distributed.is_available() and hasattr(model, "reshard")):
        return decoder(**inputs)
    from torch.distributed.fsdp import FSDPModule  # lazy: only a model with reshard() can be one

    if not isinstance(model, FSDPModule):
        return decoder(**inputs)
    model.forward = decoder.forward  # instance attribute: the class is untouched
    try:
        return model(**inputs)
    finally:
        del model.forward
        model.reshard()


@torch.no_grad()  # as collect_text
def collect_multimodal(
    model: nn.Module,
    dataset: Any,
    collator: Any,
    rows: list[int],
    batch_size: int,
    device: Any,
    progress: bool = True,
    kept: Path | None = None,
) -> dict[int, torch.Tensor]:
    """As :func:`collect_text`, image + caption through the MLLM, batches built by the SFT collator."""
    recorder = PooledInputRecorder(model, kept)
    template = getattr(collator, "template", None)
    multimodal = multimodal_token_ids(
        model.config,
        getattr(collator, "processor", None),
        getattr(collator, "tokenizer", None),
        getattr(template, "mm_plugin", None),
    )
    try:
        for batch_rows in recorder.remaining(rows, batch_size, "heads (image + caption through the MLLM)", progress):
            features = [dict(dataset[i]) for i in batch_rows]
            batch = collator(features)
            labels = batch.pop("labels")
            mask = pooled_token_mask(labels, batch["input_ids"], batch.get("attention_mask"), "assistant", multimodal)
            recorder.weights = pooling_weights(mask).to(device)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**inputs, **_last_logits_only(model))  # the hooks read o_proj inputs
            recorder.flush()
        return recorder.result()
    finally:
        recorder.remove()


@torch.no_grad()
def collect_teacher(
    teacher: VisionTeacher,
    image_processor: Any,
    pairs: list[CalibrationPair],
    batch_size: int,
    progress: bool = True,
    workers: int | None = None,
    store: TeacherFeatureStore | None = None,
    persist: bool = False,
) -> torch.Tensor:
    """``[N, E]`` float32 teacher features (mean over each pair's images); a ``store``'s images skip the teacher."""
    images = [image for pair in pairs for image in pair.images]
    if store is not None:
        feats = stored_image_features(
            teacher, image_processor, images, batch_size, store, persist=persist, workers=workers, progress=progress
        )
    else:
        feats = image_features(teacher, image_processor, images, batch_size, workers, progress)
    counts = torch.tensor([len(pair.images) for pair in pairs], device=feats.device)
    return per_sample_features(feats, counts)


def layer_weights(model: nn.Module) -> dict[int, torch.Tensor]:
    """Layer with heads -> effective ``o_proj`` weight ``[d, H*d_head]`` (LoRA included), float32 on CPU."""
    from accelerate.utils import align_module_device  # lazy: only where a model was loaded

    weights = {}
    for layer, o_proj in head_projections(model).items():
        base = getattr(o_proj, "base_layer", o_proj)
        with align_module_device(base):
            columns = torch.arange(base.in_features, device=base.weight.device)  # a 4-bit weight is packed
            weights[layer] = effective_weight_columns(o_proj, columns).detach().cpu()
    return weights


def release_memory(device: Any) -> None:
    """Collect garbage (a model in a reference cycle outlives its name), empty the device cache."""
    gc.collect()
    kind = torch.device(device).type
    backend = getattr(torch, kind, None)
    if kind != "cpu" and backend is not None and hasattr(backend, "empty_cache") and backend.is_available():
        backend.empty_cache()


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (pooling stays float32 in a bf16 forward), where autocast knows the device type."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it: scoring never reads the logits."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    forward = getattr(base, "forward", None)
    try:
        return {"logits_to_keep": 1} if forward and "logits_to_keep" in inspect.signature(forward).parameters else {}
    except (TypeError, ValueError):
        return {}
