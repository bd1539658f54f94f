"""Alignment during training: the aligned heads' MKNN with the teacher on a fixed probe set (``hera_monitor_*``;
docs/hera.md "Alignment during training"). Every rank scores (ZeRO-3 needs all in the forward); rank 0 logs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from typing_extensions import override

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.heads.geometry import HeadRef
from llamafactory_hera.hera.projection import effective_weight_columns, gathered, head_columns
from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.scores import layer_head_neighbours, teacher_neighbours
from llamafactory_hera.hera.teacher import teacher_batch_size
from llamafactory_hera.hera.teacher_cache import feature_store
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera.training import sections
from llamafactory_hera.training.eval_forward import eval_mode
from llamafactory_hera_patches.engines.deepspeed import zero3_forward
from llamafactory_hera_patches.tools.model_data import split_rows, tokenized_rows_and_collator

DEFAULT_POINTS = 10  # hera_monitor_steps: null scores at step 0 and at this many evenly spaced steps
MEAN_KEY = "hera_mknn"
HEAD_PREFIX = "hera_mknn/"
CONTROL_KEY = "hera_mknn_control"


@dataclass
class ProbeSet:
    """The monitor's fixed image-caption pairs and where they come from."""

    pairs: list[collect.CalibrationPair]
    rows: Any  # the aligned rows ``pair.row`` indexes, for multimodal tokenization
    source: str  # for the start line


def _pairs_of(rows: Any, count: int, seed: int, k: int, source: str) -> list[collect.CalibrationPair]:
    """Up to ``count`` pairs with distinct images, drawn as ``select`` does; all when fewer than ``k + 1``."""
    usable = collect.usable_pairs(rows)
    distinct = collect.distinct_image_pairs(usable, seed)
    if len(distinct) < k + 1:
        return distinct
    return collect.sample_pairs(distinct, count, seed, k, source, len(usable))


def probe_set(hera_args: Any, recipe_args: Any, training_rows: Any, seed: int) -> ProbeSet | None:
    """Probe pairs (held-out rows if enough, else training rows), or None: monitor off."""
    if hera_args.hera_monitor_steps == 0 or training_rows is None:
        return None

    needed = hera_args.hera_k + 1
    pair_seed = seed + 1  # as `select --report` draws its pairs by default
    train, held_out, held_out_name = split_rows(recipe_args, seed, training_rows)
    note = ""  # why held-out rows were not used
    if held_out is not None:
        pairs = _pairs_of(held_out, hera_args.hera_monitor_pairs, pair_seed, hera_args.hera_k, held_out_name)
        if len(pairs) >= needed:
            return ProbeSet(pairs, held_out, f"{len(pairs)} held-out pairs ({held_out_name})")
        note = f"the held-out rows ({held_out_name}) give {len(pairs)} usable pairs, fewer than hera_k+1={needed}"
    pairs = _pairs_of(train, hera_args.hera_monitor_pairs, pair_seed, hera_args.hera_k, "training rows")
    if len(pairs) < needed:
        problem = f"only {len(pairs)} usable image-caption pairs with distinct images, fewer than hera_k+1={needed}" + (
            f"; {note}" if note else ""
        )
        if hera_args.hera_monitor_steps is not None:
            raise RecipeError(
                f"hera_monitor_steps: got {hera_args.hera_monitor_steps}, but the monitor has {problem}."
                " Add data, lower hera_k, or set hera_monitor_steps: 0."
            )
        say(f"warning: alignment monitor off: {problem}.")
        return None
    reason = note or "no val_size / eval_dataset"
    return ProbeSet(pairs, train, f"{len(pairs)} training pairs ({reason})")


def control_heads(aligned: list[HeadRef], num_heads: int, seed: int) -> list[HeadRef]:
    """Per aligned head, an unaligned head of its layer (fewer if none left), drawn with ``seed``; sorted."""
    rng = random.Random(seed)
    taken = set(aligned)
    chosen: list[HeadRef] = []
    for layer in sorted({ref.layer for ref in aligned}):
        wanted = sum(ref.layer == layer for ref in aligned)
        free = [HeadRef(layer, head) for head in range(num_heads) if HeadRef(layer, head) not in taken]
        chosen += rng.sample(free, min(wanted, len(free)))
    return sorted(chosen)


def wait_for_device(device: Any) -> None:
    """On CUDA, wait for queued work so a clock read next times only what follows."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def monitor_steps(every: int | None, max_steps: int) -> set[int]:
    """Steps with a point: 0 and every ``every`` steps (None: :data:`DEFAULT_POINTS` evenly spaced)."""
    if every is not None:
        return {0, *range(every, max_steps + 1, every)} if every > 0 else set()
    return {0, *((i * max_steps + DEFAULT_POINTS // 2) // DEFAULT_POINTS for i in range(1, DEFAULT_POINTS + 1))}


class MonitorCallback(TrainerCallback):
    """Scores aligned and control heads at the scheduled steps. Added after the host's callbacks, so
    ``control.should_log`` is decided at ``on_step_end``; the trainer's ``log`` calls :meth:`merge`."""

    def __init__(self, trainer: Any, hera_args: Any, probe: ProbeSet, geometry: Any, recipe_args: Any) -> None:
        args = trainer.args
        self.trainer = trainer
        self.probe = probe
        self.every = hera_args.hera_monitor_steps
        self.aligned = list(hera_args.hera_heads)
        self.control = control_heads(self.aligned, geometry.num_heads, args.seed)
        self.geometry = geometry
        self.device = args.device
        self.k = hera_args.hera_k
        self.clamp = hera_args.hera_select_clamp
        self.mode = hera_args.hera_select_mode
        self.batch_size = hera_args.hera_select_batch_size
        self.teacher_knn: torch.Tensor | None = None  # [N, k] on the device, once
        self.steps: set[int] = set()
        self.pending: tuple[int, dict[str, float]] | None = None
        by_layer: dict[int, list[int]] = {}
        for ref in (*self.aligned, *self.control):
            by_layer.setdefault(ref.layer, []).append(ref.head)
        self.by_layer = dict(sorted(by_layer.items()))
        collator = trainer.data_collator
        self.tokenizer = getattr(collator, "tokenizer", None)  # text mode
        self.dataset: Any = None  # multimodal mode: probe rows tokenized and collated as in training
        self.collator: Any = None
        if self.mode == "multimodal":
            chosen = probe.rows.select([pair.row for pair in probe.pairs])
            tokenizer_module = {"tokenizer": self.tokenizer, "processor": getattr(collator, "processor", None)}
            self.dataset, self.collator = tokenized_rows_and_collator(
                recipe_args, trainer.model, tokenizer_module, collator.template, args.seed, chosen, args
            )

    @torch.no_grad()
    def prepare_teacher(self, teacher: Any, image_processor: Any) -> None:
        """The probe pairs' teacher neighbours, once per run."""
        if self.teacher_knn is not None:
            return
        wait_for_device(self.device)  # work queued before is not the monitor's
        feats = collect.collect_teacher(
            teacher,
            image_processor,
            self.probe.pairs,  # shared with the precompute
            teacher_batch_size(self.batch_size),
            progress=False,
            store=feature_store(teacher),
        )
        self.teacher_knn = teacher_neighbours(feats, self.k, self.device, self.clamp)
        wait_for_device(self.device)

    @torch.no_grad()
    def score(self, model: nn.Module) -> torch.Tensor:
        """``[len(aligned) + len(control)]`` float32 MKNN on the device, aligned (recipe order) then control heads."""
        if self.teacher_knn is None:
            raise RuntimeError("alignment monitor: prepare_teacher was not called before the first score")
        # per layer [N, H*d_head] pooled o_proj inputs, as in selection
        with eval_mode(model), zero3_forward(model):
            if self.mode == "multimodal":
                pooled = collect.collect_multimodal(
                    model,
                    self.dataset,
                    self.collator,
                    list(range(len(self.probe.pairs))),
                    self.batch_size,
                    self.device,
                    progress=False,
                )
            else:
                pooled = collect.collect_text(
                    model, self.tokenizer, self.probe.pairs, self.batch_size, self.device, progress=False
                )
        o_projs = head_projections(model)
        per_head: dict[HeadRef, torch.Tensor] = {}
        for layer, heads in self.by_layer.items():
            head_dim = self.geometry.head_dim_of(layer)
            columns = head_columns(heads, head_dim)
            with gathered(o_projs[layer]):
                weight = effective_weight_columns(o_projs[layer], columns.to(self.device)).detach()  # [d, n*dh]
            scores, _ = layer_head_neighbours(
                pooled[layer][:, columns].to(self.device), weight, self.teacher_knn, self.k, head_dim, clamp=self.clamp
            )
            per_head.update({HeadRef(layer, head): score for head, score in zip(heads, scores, strict=True)})
        return torch.stack([per_head[ref] for ref in (*self.aligned, *self.control)])

    def logs(self, scores: list[float]) -> dict[str, float]:
        aligned = scores[: len(self.aligned)]
        control = scores[len(self.aligned) :]
        logs = {MEAN_KEY: sum(aligned) / len(aligned)}
        logs.update({f"{HEAD_PREFIX}{ref}": value for ref, value in zip(self.aligned, aligned, strict=True)})
        if control:
            logs[CONTROL_KEY] = sum(control) / len(control)
        return logs

    def line(self) -> str:
        """The monitor's part of the start line."""
        when = (
            f"every {self.every} steps"
            if self.every is not None
            else f"{DEFAULT_POINTS} evenly spaced steps to the last"
        )
        control = ", ".join(str(ref) for ref in self.control) or "none"
        return (
            f"alignment monitor at step 0 and {when} on {self.probe.source}, {self.mode} mode, "
            f"k {self.k}, control heads [{control}]"
        )

    def point(self, model: nn.Module) -> dict[str, float]:
        """Score the heads now (every rank; rank 0's values) and return the metrics."""
        wait_for_device(self.device)  # queued kernels are the step's time, not the point's
        scores = self.score(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with sections.collective("the alignment monitor's broadcast of rank 0's scores"):
                torch.distributed.broadcast(scores, src=0)
        return self.logs(scores.tolist())  # the monitor's one device-to-host copy

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.steps = monitor_steps(self.every, int(state.max_steps))
        if state.global_step == 0:
            self.trainer.log(self.point(self.trainer.model))

    @override
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.flush()

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.global_step not in self.steps:
            return
        logs = self.point(self.trainer.model)
        if control.should_log:
            self.pending = (state.global_step, logs)
        else:
            self.trainer.log(logs)

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.flush()

    def merge(self, logs: dict[str, float], step: int) -> None:
        """Put this step's point into its training log."""
        if self.pending is not None and self.pending[0] == step:
            logs.update(self.pending[1])
            self.pending = None

    def flush(self) -> None:
        """Log alone a point no training log took."""
        pending = self.pending
        self.pending = None
        if pending is not None:
            self.trainer.log(dict(pending[1]))
