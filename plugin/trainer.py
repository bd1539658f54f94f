"""Trainer mixin that adds ``lambda * L_HeRA`` to the language-model loss.

Mixed in front of LLaMA-Factory's ``CustomSeq2SeqTrainer`` (see ``patches/stage.py``). It
- captures the selected heads' pooled representations during the ordinary forward pass,
- runs the frozen teacher on the batch's images and builds teacher kNN targets,
- scales the HeRA term exactly like the LM loss under gradient accumulation,
- keeps the learnable log-temperature in its own optimizer group, saves it in every checkpoint
  (``hera_state.json``) and restores it on resume,
- logs ``lm_loss``, ``hera_loss``, ``hera_temperature``, ``hera_image_samples`` and
  ``hera_text_only_samples`` every logging step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from . import __version__
from .args import HeraArguments
from .capture import HeadCapture, pooled_token_mask, pooling_weights
from .collator import HERA_BATCH_KEYS
from .contrastive import FeatureQueue, all_ranks_true, distributed, gather_batch
from .heads import attention_geometry
from .loss import hera_loss_anchored
from .teacher import load_image_processor, load_teacher, open_image, per_sample_features
from .teacher_batch import teacher_batch_size
from .teacher_cache import TeacherFeatureCache
from .teacher_precompute import precompute_teacher_features, precompute_wanted, teacher_bytes, training_images

HERA_STATE_NAME = "hera_state.json"
TAU_OPTIMIZER_NAME = "hera_temperature_optimizer.pt"
LOG_KEYS = ("lm_loss", "hera_loss", "hera_temperature", "hera_image_samples", "hera_text_only_samples",
            "hera_nonfinite_skipped", "hera_queue_size")


class _TemperatureGradHandler(TrainerCallback):
    """Owns the gradient (and, under DeepSpeed, the update) of the temperature, which lives outside the model.

    - Before each optimizer step it averages the gradient over data-parallel ranks (DDP does not
      see the parameter). Every rank takes part, with a zero gradient when its micro-batches had
      no HeRA term, so the collective always matches.
    - Under DeepSpeed, whose ZeRO optimizer accepts only the model's own parameters, the temperature
      has its own AdamW (``own_optimizer``), stepped here with the main schedule's learning-rate
      factor (current lr of the main optimizer / ``learning_rate``).
    - After each step it clears the gradient: the Trainer zeroes gradients with
      ``model.zero_grad()``, which does not reach this parameter.
    """

    def __init__(self, log_tau: nn.Parameter, base_lr: float) -> None:
        self.log_tau = log_tau
        self.base_lr = base_lr
        self.own_optimizer: torch.optim.Optimizer | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.log_tau.grad is None:
                self.log_tau.grad = torch.zeros_like(self.log_tau)
            torch.distributed.all_reduce(self.log_tau.grad)
            self.log_tau.grad /= torch.distributed.get_world_size()
        if self.own_optimizer is not None and self.log_tau.grad is not None:
            main = kwargs.get("optimizer")
            factor = main.param_groups[0]["lr"] / args.learning_rate if main is not None and args.learning_rate else 1
            for group in self.own_optimizer.param_groups:
                group["lr"] = self.base_lr * factor
            self.own_optimizer.step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.log_tau.grad = None


def _check_same_heads_on_every_rank(heads: list[str]) -> None:
    """Raise unless every data-parallel rank aligns the same heads (once, at trainer start)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, heads)
    if any(other != heads for other in gathered):
        raise RuntimeError(f"hera_heads differ across ranks: {gathered}; every rank must align the same heads")


class HeraTrainerMixin:
    """Mix in front of a Hugging Face ``Trainer`` subclass; pass ``hera_args=HeraArguments`` to ``__init__``."""

    def __init__(self, *args: Any, hera_args: HeraArguments, hera_compute_dtype: torch.dtype | None = None,
                 hera_feature_cache: TeacherFeatureCache | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hera_args = hera_args
        model = self.model
        _check_same_heads_on_every_rank(list(hera_args.hera_heads))
        self.hera_geometry = attention_geometry(model.config)
        self.hera_capture = HeadCapture(model, hera_args.head_refs, self.hera_geometry)
        device = self.args.device
        dtype = hera_compute_dtype or next(model.parameters()).dtype
        self.hera_teacher = load_teacher(hera_args.hera_teacher, hera_args.hera_teacher_feature, dtype, device)
        self.hera_feature_cache = hera_feature_cache or TeacherFeatureCache(enabled=False)
        self._hera_teacher_dim = int(self.hera_teacher.encoder.config.hidden_size)
        self.hera_queue = FeatureQueue(hera_args.queue_capacity(needed=False))
        self.hera_log_tau = nn.Parameter(
            torch.tensor(math.log(hera_args.hera_temperature), dtype=torch.float32, device=device),
            requires_grad=hera_args.hera_learn_temperature,
        )
        self._hera_tau_handler = _TemperatureGradHandler(
            self.hera_log_tau, hera_args.hera_temperature_lr or self.args.learning_rate)
        if hera_args.hera_learn_temperature:
            self.add_callback(self._hera_tau_handler)
            if getattr(self, "is_deepspeed_enabled", False):
                self._hera_tau_handler.own_optimizer = torch.optim.AdamW(
                    [self.hera_log_tau], lr=self._hera_tau_handler.base_lr, betas=(self.args.adam_beta1,
                    self.args.adam_beta2), eps=self.args.adam_epsilon, weight_decay=0.0)
        image_token_id = getattr(model.config, "image_token_id", None)
        self.hera_image_token_id = image_token_id if image_token_id is not None else getattr(
            model.config, "image_token_index", None
        )
        # Sums since the last log: LM loss as it enters backward, HeRA loss, micro-batches with a HeRA term,
        # image samples and text-only samples in contrastive batches, micro-batches, non-finite terms skipped.
        self._hera_stats = torch.zeros(7, dtype=torch.float64, device=device)
        self._hera_last_logged_step: int | None = None  # set at the first training step (resume-aware)
        self._hera_warned_small_batch = False
        self._hera_warned_nonfinite = False

    # ----------------------------------------------------------------------------- optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._hera_tau_handler.own_optimizer is not None:  # DeepSpeed: the temperature has its own optimizer
            return optimizer
        if self.hera_args.hera_learn_temperature and not any(
            p is self.hera_log_tau for group in optimizer.param_groups for p in group["params"]
        ):
            lr = self.hera_args.hera_temperature_lr or self.args.learning_rate
            optimizer.add_param_group({"params": [self.hera_log_tau], "lr": lr, "weight_decay": 0.0})
        return optimizer

    # ----------------------------------------------------------------------------- teacher before training
    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._hera_precompute_teacher()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._hera_teacher_to(self.args.device)  # the process-wide teacher goes back where load_teacher put it

    def _hera_teacher_to(self, device: torch.device | str) -> bool:
        """Move the teacher to ``device``; True if it was elsewhere."""
        if next(self.hera_teacher.parameters()).device == torch.device(device):
            return False
        self.hera_teacher.to(device)
        return True

    def _hera_precompute_teacher(self) -> None:
        """``hera_teacher_precompute``: fill the feature cache with every training image's teacher feature, then
        move the teacher to the CPU when nothing is left for it to do in the steps."""
        dataset = self.train_dataset
        has_images = dataset is not None and hasattr(dataset, "__len__") and "images" in (
            getattr(dataset, "column_names", None) or ())
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if not precompute_wanted(self.hera_args.hera_teacher_precompute, self.hera_feature_cache.enabled,
                                 len(dataset) if has_images else None, args.max_steps, global_batch):
            return
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

    # ----------------------------------------------------------------------------- loss
    def _hera_teacher_features(self, pixel_values: torch.Tensor | None, keys: list[str | None],
                               counts: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` per-sample teacher features: cached images from the cache, the others computed now."""
        if pixel_values is not None and self._hera_teacher_to(self.args.device):
            print("[llamafactory-hera] an image missed by the precomputed teacher features: the teacher went back "
                  f"to {self.args.device} for the rest of the run.")
        computed = self.hera_teacher(pixel_values) if pixel_values is not None else None
        image_features = self.hera_feature_cache.lookup(keys, computed)
        return per_sample_features(image_features.to(counts.device), counts)

    def _hera_term(self, reps: torch.Tensor, pixel_values: torch.Tensor | None, keys: list[str | None],
                   counts: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor | None, int, int, float]:
        """HeRA loss of this rank's samples that have images and pooled tokens.

        Anchors are this rank's valid samples; candidates are the global batch's (``hera_gather``) plus the
        queue. Every decision that decides whether a collective runs is taken on global quantities, so all
        ranks always agree.

        Returns:
            (loss or None, image samples used here, text-only samples here, 1.0 if a non-finite loss was dropped).
        """
        args = self.hera_args
        has_tokens = token_mask.any(-1)
        valid = (counts.to(has_tokens.device) > 0) & has_tokens
        num_valid = int(valid.sum())
        text_only = int((counts == 0).sum())
        device = reps.device
        if num_valid > 0:
            teacher_all = self._hera_teacher_features(pixel_values, keys, counts.to(device))
            anchors = reps[:, valid.to(device)]
            anchor_teacher = teacher_all[valid.to(teacher_all.device)].to(device).float()
        else:
            anchors = reps[:, :0]
            anchor_teacher = torch.zeros(0, self._hera_teacher_dim, device=device)
        gather = args.hera_gather and distributed()
        if gather:
            candidates, candidate_teacher, offset, sizes = gather_batch(anchors, anchor_teacher)
            total_anchors = sum(sizes)
        else:
            candidates, candidate_teacher, offset, total_anchors = anchors, anchor_teacher, 0, num_valid
        batch_reps, batch_teacher = candidates.detach(), candidate_teacher
        capacity = args.queue_capacity(needed=0 < total_anchors < args.hera_k + 1)
        if capacity > self.hera_queue.capacity:
            self.hera_queue.capacity = capacity
            print(f"[llamafactory-hera] contrastive batches of {total_anchors} image samples are too small for "
                  f"hera_k={args.hera_k}: using a queue of the {capacity} most recent samples (hera_queue_size).")
        if len(self.hera_queue) and total_anchors > 0:
            candidates = torch.cat([candidates, self.hera_queue.reps.to(device)], dim=1)
            candidate_teacher = torch.cat([candidate_teacher, self.hera_queue.teacher.to(device)])
        self.hera_queue.push(batch_reps, batch_teacher)  # after use: the queue holds earlier batches only
        num_candidates = candidates.shape[1]
        if total_anchors == 0 or num_candidates < 2:
            return None, num_valid, text_only, 0.0
        k = min(args.hera_k, num_candidates - 1)
        if k < args.hera_k and not self._hera_warned_small_batch:
            self._hera_warned_small_batch = True
            print(f"[llamafactory-hera] warning: only {num_candidates} candidates in a contrastive set, fewer than "
                  f"hera_k+1={args.hera_k + 1}; using k={k} for such batches.")
        anchor_index = offset + torch.arange(num_valid, device=device)
        per_anchor = hera_loss_anchored(anchors, candidates, anchor_index, anchor_teacher, candidate_teacher, k,
                                        self.hera_log_tau.exp(), args.hera_similarity)
        if gather:  # sum of local anchors scaled so that DDP's average over ranks is the global mean
            loss = per_anchor.sum() * (torch.distributed.get_world_size() / total_anchors) + 0.0 * candidates.sum()
        else:
            loss = per_anchor.mean()
        finite = bool(torch.isfinite(loss))
        if gather:
            finite = all_ranks_true(finite, device)
        if not finite:
            return None, num_valid, text_only, 1.0
        return loss, num_valid, text_only, 0.0

    def _trainer_divides_by_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``Trainer.training_step``'s rule for dividing the loss by the accumulation steps."""
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        pixel_values = inputs.pop("hera_pixel_values", None)
        counts = inputs.pop("hera_image_counts", None)
        keys = inputs.pop("hera_image_keys", None)
        if not model.training or counts is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self._hera_last_logged_step is None:
            self._hera_last_logged_step = self.state.global_step
        token_mask = pooled_token_mask(inputs["labels"], inputs["input_ids"], inputs.get("attention_mask"),
                                       self.hera_args.hera_pooling, self.hera_image_token_id)
        self.hera_capture.arm()
        try:
            lm_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                    num_items_in_batch=num_items_in_batch)
        finally:
            reps = self.hera_capture.disarm(pooling_weights(token_mask))
        if reps is None:
            raise RuntimeError("HeRA hooks did not fire: the model's o_proj modules were not called in the forward.")
        term, num_images, text_only, skipped = self._hera_term(reps, pixel_values, keys, counts, token_mask)
        if skipped:  # never let a NaN/inf reach the weights
            if not self._hera_warned_nonfinite:
                self._hera_warned_nonfinite = True
                print("[llamafactory-hera] warning: non-finite HeRA loss; the term is skipped for such micro-batches "
                      "(counted as hera_nonfinite_skipped in the logs). Check hera_temperature / bf16 overflow.")
        # The Trainer divides the returned loss by the accumulation steps unless the model already normalised it
        # over the whole accumulated batch; in that case the HeRA term is divided here, so that both terms reach
        # backward with the same 1/accumulation weight.
        trainer_divides = self._trainer_divides_by_accumulation(num_items_in_batch)
        accumulation = 1 if trainer_divides else self.current_gradient_accumulation_steps
        total = lm_loss
        if term is not None:
            total = lm_loss + (self.hera_args.hera_lambda * term / accumulation).to(lm_loss.dtype)
        lm_share = lm_loss.detach().double() / (self.current_gradient_accumulation_steps if trainer_divides else 1)
        increment = torch.tensor([0.0, 0.0, float(term is not None), num_images, text_only, 1.0, skipped],
                                 dtype=torch.float64).to(self._hera_stats.device, non_blocking=True)
        increment[0] = lm_share
        if term is not None:
            increment[1] = term.detach().double()
        self._hera_stats += increment
        return (total, outputs) if return_outputs else total

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in HERA_BATCH_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # ----------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: same decision on every rank, so the reduction below is safe
            temperature = self.hera_log_tau.detach().exp().double().reshape(1).to(self._hera_stats.device)
            stats = torch.cat([self._hera_stats, temperature])
            world = 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
                world = torch.distributed.get_world_size()
            lm_sum, hera_sum, hera_micro, images, text_only, micro, skipped, temperature_sum = stats.tolist()
            optimizer_steps = max(self.state.global_step - (self._hera_last_logged_step or 0), 1)
            if micro > 0:
                # Same normalisation as the Trainer's logged `loss`, so loss == lm_loss + lambda * hera_loss.
                logs["lm_loss"] = lm_sum / world / optimizer_steps
                logs["hera_image_samples"] = images / micro
                logs["hera_text_only_samples"] = text_only / micro
                if skipped:
                    logs["hera_nonfinite_skipped"] = skipped
            if hera_micro > 0:
                logs["hera_loss"] = hera_sum / hera_micro
            logs["hera_temperature"] = temperature_sum / world  # mean over ranks (equal when in sync)
            if self.hera_queue.capacity:
                logs["hera_queue_size"] = len(self.hera_queue)
            self._hera_stats.zero_()
            self._hera_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------- state
    def hera_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume HeRA exactly (JSON-serialisable)."""
        log_tau = float(self.hera_log_tau.detach().cpu())
        return {"version": __version__, "log_temperature": log_tau, "temperature": math.exp(log_tau),
                "heads": list(self.hera_args.hera_heads), "hera_args": self.hera_args.to_dict()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            target = output_dir or self.args.output_dir
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, HERA_STATE_NAME), "w", encoding="utf-8") as handle:
                json.dump(self.hera_state(), handle, indent=2)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._hera_tau_handler.own_optimizer is not None and self.args.should_save:
            torch.save(self._hera_tau_handler.own_optimizer.state_dict(), os.path.join(output_dir, TAU_OPTIMIZER_NAME))
        if self.hera_queue.capacity:  # every rank its own file (queues differ per rank without hera_gather)
            name = f"hera_queue_rank{self.args.process_index}.pt"
            torch.save(self.hera_queue.state_dict(), os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        tau_optimizer = os.path.join(checkpoint, TAU_OPTIMIZER_NAME)
        if self._hera_tau_handler.own_optimizer is not None and os.path.isfile(tau_optimizer):
            self._hera_tau_handler.own_optimizer.load_state_dict(torch.load(tau_optimizer, weights_only=True))
        queue_file = os.path.join(checkpoint, f"hera_queue_rank{self.args.process_index}.pt")
        if os.path.isfile(queue_file):
            self.hera_queue.load_state_dict(torch.load(queue_file, weights_only=True), self.args.device)
        path = os.path.join(checkpoint, HERA_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from_checkpoint: {checkpoint} has no {HERA_STATE_NAME}; it was not "
                                    "written by a HeRA run. Resume from a HeRA checkpoint or start a fresh run.")
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        if state["heads"] != list(self.hera_args.hera_heads):
            raise ValueError(f"hera_heads: the checkpoint {checkpoint} trained heads {state['heads']} but the recipe "
                             f"says {self.hera_args.hera_heads}; resume with the same heads or start a fresh run.")
        with torch.no_grad():
            self.hera_log_tau.fill_(state["log_temperature"])
