"""The teacher in a HeRA run (:class:`RunTeacher`, owned by the trainer). With ``hera_teacher_precompute`` one pass
over the training set's distinct images, split over the ranks, fills the feature cache (docs/hera-design.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from llamafactory_hera.hera.loss import distributed
from llamafactory_hera.hera.teacher import (
    VisionTeacher,
    continuing,
    image_features,
    load_image_processor,
    load_teacher,
    open_image,
    per_sample_features,
    teacher_batch_size,
)
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache, TeacherFeatureStore, feature_store, image_key
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera.training import sections

GATHER_ROWS = 4096  # rows per all-gather: 16 MB per rank at E=1024


def precompute_wanted(
    setting: str, cache_enabled: bool, num_samples: int | None, max_steps: int, global_batch: int
) -> bool:
    """``auto``: when the cache is on and the run sees every sample."""
    if setting != "auto":
        return setting == "true"
    if not cache_enabled or num_samples is None:
        return False
    return max_steps <= 0 or max_steps * global_batch >= num_samples


def training_images(rows: Iterable[list[Any] | None]) -> tuple[dict[str, Any], int]:
    """The training set's distinct ``images`` entries by cache key, and how many cannot be keyed."""
    by_key: dict[str, Any] = {}
    uncacheable = 0
    for images in rows:
        for image in images or ():
            key = image_key(image)
            if key is None:
                uncacheable += 1
            else:
                by_key.setdefault(key, image)
    return by_key, uncacheable


def stored_rows(store: TeacherFeatureStore | None, keys: list[str]) -> dict[int, torch.Tensor]:
    """The store's rows by position in sorted ``keys``; rank 0's are broadcast so every rank skips the same
    positions. Collective."""
    if not distributed():
        return _by_position(store, keys)
    counts = [None] * torch.distributed.get_world_size()
    with sections.collective("the teacher pass's all-gather of the image counts"):
        torch.distributed.all_gather_object(counts, len(keys))
    if len(set(counts)) > 1:
        raise RecipeError(
            f"hera_teacher_precompute: the ranks see different numbers of distinct training images "
            f"({', '.join(f'rank {r}: {n}' for r, n in enumerate(counts))}), so their teacher "
            "features cannot be gathered together. Give every node the same copy of the image files, "
            "or set hera_teacher_precompute: false."
        )
    payload = [_by_position(store, keys) if torch.distributed.get_rank() == 0 else None]
    with sections.collective("the teacher pass's broadcast of rank 0's stored rows"):
        torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0] or {}


def _by_position(store: TeacherFeatureStore | None, keys: list[str]) -> dict[int, torch.Tensor]:
    found = store.get(keys) if store is not None else {}
    return {position: found[key] for position, key in enumerate(keys) if key in found}


@save_signal.keeping()  # the save signal stops the pass after a kept batch
def precompute_teacher_features(
    teacher: VisionTeacher,
    image_processor: Any,
    by_key: dict[str, Any],
    cache: TeacherFeatureCache,
    batch_size: int,
    opener: Callable[[Any], Any],
    progress: bool,
    store: TeacherFeatureStore | None = None,
) -> tuple[int, int]:
    """Fill ``cache`` with every keyed image's feature: the ``store``'s rows, then this rank computes
    ``keys[rank::world]`` of the others, gathered. Collective. (images this rank computed, images from the store)."""
    keys = sorted(by_key)
    stored = stored_rows(store, keys)
    cache.features.update({keys[position]: row for position, row in stored.items()})
    keys = [key for position, key in enumerate(keys) if position not in stored]
    rank = torch.distributed.get_rank() if distributed() else 0
    world = torch.distributed.get_world_size() if distributed() else 1
    mine = keys[rank::world]
    desc = "teacher features (before training)"
    if progress:
        continuing(len(stored), len(stored) + len(keys), desc)

    def keep(first: int, rows: torch.Tensor) -> None:  # a killed run's rerun reads them
        rows = dict(zip(mine[first : first + len(rows)], rows.float().cpu(), strict=True))
        cache.features.update(rows)
        if store is not None:
            store.add(rows, persist=True)

    with save_signal.deferred() if world > 1 else contextlib.nullcontext():  # ranks stop together below
        local = image_features(
            teacher,
            image_processor,
            [by_key[k] for k in mine],
            batch_size,
            progress=progress,
            desc=desc,
            opener=opener,
            keep=keep,
        ).float()  # [len(mine), E]
    if world == 1:
        return len(mine), len(stored)
    backend = torch.distributed.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    noted = torch.tensor([float(save_signal.received())], device=comm)
    with sections.collective("the teacher pass's all-reduce of the stop signal"):
        torch.distributed.all_reduce(noted)  # every rank, signalled or not: one stop for all
    save_signal.stop_before_step("the teacher features computed so far kept in its store", agreed=noted.item() > 0)
    per_rank = -(-len(keys) // world)
    padded = torch.zeros(per_rank, local.shape[-1], dtype=local.dtype, device=comm)
    padded[: len(mine)] = local.to(comm)
    for start in range(0, per_rank, GATHER_ROWS):
        piece = padded[start : start + GATHER_ROWS].contiguous()
        gathered = [torch.empty_like(piece) for _ in range(world)]
        with sections.collective("the teacher pass's all-gather of the features"):
            torch.distributed.all_gather(gathered, piece)
        for source, block in enumerate(gathered):
            block = block.to("cpu")
            for offset in range(block.shape[0]):
                index = (start + offset) * world + source  # keys[source::world][start + offset]
                if index < len(keys):
                    cache.features[keys[index]] = block[offset].clone()
    return len(mine), len(stored)


def check_same_on_every_rank(model: torch.nn.Module, key: str, name: str) -> None:
    """Refuse on every rank a frozen model whose weights differ across ranks. Collective."""
    if not distributed():
        return
    parts = [
        torch.stack([values.sum(), values.abs().sum()])
        for values in (  # one float64 copy at a time
            tensor.detach().double() for tensor in (*model.parameters(), *model.buffers())
        )
    ]
    sums = torch.stack(parts).sum(0).tolist() if parts else [0.0, 0.0]
    every: list[Any] = [None] * torch.distributed.get_world_size()
    with sections.collective("the all-gather of the teacher's weight sums"):
        torch.distributed.all_gather_object(every, sums)
    table = torch.tensor(every, dtype=torch.float64)  # [world, 2]; equal up to summation order
    differ = [rank for rank in range(len(every)) if not torch.allclose(table[rank], table[0], rtol=1e-9, atol=0.0)]
    if differ:  # rank 0 and the first differing: one line
        shown = [0, *differ[:7]]
        raise RecipeError(
            f"{key}: '{name}' loaded with other weights on some ranks (sum, absolute sum: "
            f"{'; '.join(f'rank {r}: {every[r][0]:g}, {every[r][1]:g}' for r in shown)}"
            f"{f'; {len(differ) - 7} more ranks differ' if len(differ) > 7 else ''}), so each "
            "rank would align to another teacher. Give every node the same copy of it."
        )


def _has_images(dataset: Any) -> bool:
    return (
        dataset is not None
        and hasattr(dataset, "__len__")
        and "images" in (getattr(dataset, "column_names", None) or ())
    )


class RunTeacher:
    """Teacher features for the HeRA term: precomputed, or computed per batch and cached."""

    def __init__(self, hera_args: Any, cache: TeacherFeatureCache | None, device: torch.device) -> None:
        self.hera_args = hera_args
        self.device = device  # where load_teacher puts it; it returns there after train()
        # float32 (TEACHER_DTYPE) whatever the model's dtype
        self.model = load_teacher(hera_args.hera_teacher, hera_args.hera_teacher_feature, device)
        check_same_on_every_rank(self.model, "hera_teacher", hera_args.hera_teacher)
        self.cache = cache or TeacherFeatureCache(enabled=False)
        self.dim = int(self.model.encoder.config.hidden_size)
        self._precompute: bool | None = None

    def image_processor(self, collator: Any) -> Any:
        return getattr(collator, "hera_image_processor", None) or load_image_processor(self.hera_args.hera_teacher)

    def to(self, device: torch.device | str) -> bool:
        """Move to ``device``; True if it was elsewhere."""
        if next(self.model.parameters()).device == torch.device(device):
            return False
        self.model.to(device)
        return True

    def precompute_decision(self, dataset: Any, args: Any) -> bool:
        """Whether this run precomputes (decided once)."""
        if self._precompute is None:
            global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self._precompute = precompute_wanted(
                self.hera_args.hera_teacher_precompute,
                self.cache.enabled,
                len(dataset) if _has_images(dataset) else None,
                args.max_steps,
                global_batch,
            )
        return self._precompute

    def precompute(self, dataset: Any, collator: Any, args: Any, main_process: bool) -> None:
        """Fill the cache with every training image's feature."""
        if not self.precompute_decision(dataset, args):
            return
        if not _has_images(dataset) or not self.cache.enabled:
            say(
                "hera_teacher_precompute: the training set has no readable `images` column "
                "(streaming?) or the teacher cache is off; teacher features are computed in the steps."
            )
            return
        by_key, uncacheable = training_images(dataset["images"])
        start = time.perf_counter()  # the pass and gather only
        computed_here, from_store = precompute_teacher_features(
            self.model,
            self.image_processor(collator),
            by_key,
            self.cache,
            teacher_batch_size(args.per_device_train_batch_size),
            getattr(collator, "_open", open_image),
            progress=main_process and not args.disable_tqdm,
            store=feature_store(self.model),
        )
        seconds = time.perf_counter() - start
        moved = ""
        if uncacheable == 0 and torch.device(args.device).type != "cpu":
            self.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            moved = f"; teacher moved off {args.device} ({size / 2**30:.2f} GiB)"
        elif uncacheable:
            moved = f"; {uncacheable} in-memory images cannot be cached, so the teacher stays on {args.device}"
        if main_process:
            shared = f", {from_store} from this teacher's earlier pass (head selection, monitor)" if from_store else ""
            say(
                f"teacher features of {len(by_key)} training images computed before the "
                f"first step in {seconds:.1f} s ({computed_here} on this rank{shared}){moved}."
            )

    def features(
        self,
        pixel_values: torch.Tensor | None,
        pixel_keys: list[str] | None,
        keys: list[str | None],
        counts: torch.Tensor,
        device: torch.device,
        one_each: bool = False,
    ) -> torch.Tensor:
        """``[B, E]`` per-sample features on ``device``: computed images by identity, the rest cached.
        ``one_each``: one image per sample."""
        if pixel_values is not None and self.to(self.device):
            say(
                "an image missed by the precomputed teacher features: the teacher went back "
                f"to {self.device} for the rest of the run."
            )
        computed = self.model(pixel_values) if pixel_values is not None else None
        image_features = self.cache.lookup(keys, computed, pixel_keys, device)
        return per_sample_features(image_features, counts.to(device), num_images=len(keys), one_each=one_each)
