"""Trainer mixin that adds ``lambda * L_HeRA`` to the language-model loss.

Mixed in front of LLaMA-Factory's ``CustomSeq2SeqTrainer`` (see ``llamafactory_hera_patches/stage.py``). It
- captures the selected heads' pooled representations during the ordinary forward pass,
- takes the batch's teacher features (precomputed, cached or computed now; ``trainer_teacher``),
- scales the HeRA term exactly like the LM loss under gradient accumulation,
- keeps the learnable log-temperature in its own optimizer group (``temperature``) and in every
  checkpoint (``trainer_state``),
- logs ``lm_loss``, ``hera_loss``, ``hera_weighted_loss``, ``hera_temperature`` and the sample counts
  every logging step, and says so when micro-batches carry no HeRA term,
- scores the aligned heads' MKNN with the teacher on a probe set during training (``trainer_monitor``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llamafactory_hera.anatomy.heads import attention_geometry
from llamafactory_hera.anatomy.pooling import multimodal_token_ids, pooling_weights, require_multimodal_ids
from llamafactory_hera.hera.args import HeraArguments
from llamafactory_hera.hera.capture import HeadCapture
from llamafactory_hera.hera.collator import HERA_BATCH_KEYS
from llamafactory_hera.hera.contrastive import FeatureQueue, all_ranks_all, distributed, gather_batch
from llamafactory_hera.hera.loss import hera_loss_anchored
from llamafactory_hera.hera.method import LOG_KEYS
from llamafactory_hera.hera.preflight import contrastive_geometry
from llamafactory_hera.hera.run_summary import HeraRunSummary
from llamafactory_hera.hera.teacher import load_teacher
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.temperature import TemperatureGradHandler, used_temperature
from llamafactory_hera.hera.trainable_heads import check_heads_train
from llamafactory_hera.hera.trainer_monitor import HeraMonitorMixin
from llamafactory_hera.hera.trainer_state import HERA_STATE_NAME, TAU_OPTIMIZER_NAME, HeraStateMixin
from llamafactory_hera.hera.trainer_stats import HeraStatsMixin
from llamafactory_hera.hera.trainer_teacher import HeraTeacherMixin
from llamafactory_hera.short_errors import RecipeError

__all__ = ["HERA_STATE_NAME", "LOG_KEYS", "TAU_OPTIMIZER_NAME", "HeraTrainerMixin"]


def _check_same_heads_on_every_rank(heads: list[str]) -> None:
    """Raise unless every data-parallel rank aligns the same heads (once, at trainer start)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, heads)
    if any(other != heads for other in gathered):
        raise RecipeError(f"hera_heads differ across ranks: {gathered}; every rank must align the same heads")


def _collator_token_sources(collator: Any) -> dict[str, Any]:
    """Processor, tokenizer and LLaMA-Factory mm_plugin known to the SFT collator (for multimodal token ids)."""
    template = getattr(collator, "template", None)
    return {"processor": getattr(collator, "processor", None), "tokenizer": getattr(collator, "tokenizer", None),
            "mm_plugin": getattr(template, "mm_plugin", None)}


class HeraTrainerMixin(HeraTeacherMixin, HeraStateMixin, HeraStatsMixin, HeraMonitorMixin):
    """Mix in front of a Hugging Face ``Trainer`` subclass; pass ``hera_args=HeraArguments`` to ``__init__``."""

    def __init__(self, *args: Any, hera_args: HeraArguments,
                 hera_feature_cache: TeacherFeatureCache | None = None, hera_data_counts: Any = None,
                 hera_probe: Any = None, hera_recipe_args: Any = None, hera_auto_heads: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hera_args = hera_args
        model = self.model
        _check_same_heads_on_every_rank(list(hera_args.hera_heads))
        self.hera_geometry = attention_geometry(model.config)
        # before anything else loads: heads no trainable weight can move would train only the temperature
        check_heads_train(model, hera_args.head_refs, hera_auto_heads, getattr(self, "finetuning_args", None))
        self.hera_capture = HeadCapture(model, hera_args.head_refs, self.hera_geometry)
        device = self.args.device
        # float32 (teacher.TEACHER_DTYPE) whatever the model's dtype; precomputed, it leaves the GPU after its pass
        self.hera_teacher = load_teacher(hera_args.hera_teacher, hera_args.hera_teacher_feature, device)
        self.hera_feature_cache = hera_feature_cache or TeacherFeatureCache(enabled=False)
        self._hera_teacher_dim = int(self.hera_teacher.encoder.config.hidden_size)
        self.hera_contrastive = contrastive_geometry(hera_args, self.args.per_device_train_batch_size,
                                                     self.args.world_size)
        self.hera_queue = FeatureQueue(self.hera_contrastive.queue)
        self.hera_log_tau = nn.Parameter(
            torch.tensor(math.log(hera_args.hera_temperature), dtype=torch.float32, device=device),
            requires_grad=hera_args.hera_learn_temperature,
        )
        self._hera_tau_handler = TemperatureGradHandler(self.hera_log_tau, self.hera_temperature_lr)
        if hera_args.hera_learn_temperature:
            self.add_callback(self._hera_tau_handler)
            if getattr(self, "is_deepspeed_enabled", False):
                self._hera_tau_handler.own_optimizer = torch.optim.AdamW(
                    [self.hera_log_tau], lr=self._hera_tau_handler.base_lr, betas=(self.args.adam_beta1,
                    self.args.adam_beta2), eps=self.args.adam_epsilon, weight_decay=0.0)
        self.hera_multimodal_ids = require_multimodal_ids(
            multimodal_token_ids(model.config, **_collator_token_sources(self.data_collator)),
            str(getattr(model.config, "model_type", "?")))
        # the collator computes the pooled tokens and the anchors on the CPU (no host sync in the step)
        self.data_collator.hera_multimodal_ids = self.hera_multimodal_ids
        self.data_collator.hera_pooling = hera_args.hera_pooling
        self._hera_init_stats(device)
        self.hera_summary = HeraRunSummary(hera_args, hera_data_counts)
        self._hera_warned_small_batch = False
        self._hera_init_monitor(hera_probe, hera_recipe_args)  # hera_probe: monitor.ProbeSet, None when off

    @property
    def hera_temperature_lr(self) -> float:
        """Learning rate of log(tau): ``hera_temperature_lr``, or the run's ``learning_rate`` when null."""
        return self.hera_args.hera_temperature_lr or self.args.learning_rate

    # ----------------------------------------------------------------------------- optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._hera_tau_handler.own_optimizer is not None:  # DeepSpeed: the temperature has its own optimizer
            return optimizer
        if self.hera_args.hera_learn_temperature and not any(
            p is self.hera_log_tau for group in optimizer.param_groups for p in group["params"]
        ):
            optimizer.add_param_group({"params": [self.hera_log_tau], "lr": self.hera_temperature_lr,
                                       "weight_decay": 0.0})
        return optimizer

    # ----------------------------------------------------------------------------- run
    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_world_process_zero():
            self.hera_summary.print_start(self)
        self._hera_monitor_prepare_teacher()  # before the teacher may leave the device
        self._hera_precompute_teacher()
        try:
            result = super().train(*args, **kwargs)
            self._hera_read_stats(reduce=False)  # steps after the last log: their checks, the summary's counts
            self.hera_summary.print_end(self)
            return result
        finally:
            self._hera_teacher_to(self.args.device)  # the process-wide teacher goes back where load_teacher put it

    # ----------------------------------------------------------------------------- loss
    def _hera_term(self, reps: torch.Tensor, pixel_values: torch.Tensor | None, pixel_keys: list[str] | None,
                   keys: list[str | None], counts: torch.Tensor, anchor_index: torch.Tensor, num_valid: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """HeRA loss of this rank's samples that have images and pooled tokens (``anchor_index``, from the collator).

        Anchors are this rank's valid samples; candidates are the global batch's (``hera_gather``) plus the
        queue. Every decision that decides whether a collective runs is taken on global quantities, so all
        ranks always agree. Nothing here waits on the device, except the exchange of the ranks' anchor counts
        under ``hera_gather`` (see :func:`gather_batch`).

        Returns:
            (loss, finite) or (None, None) when the batch has no term: ``loss`` 0-d float32, 0 where the loss
            was not finite (on any rank under ``hera_gather``), ``finite`` 0-d bool on the device. A non-finite
            loss sends no gradient (hooks zero it where it enters the heads and the temperature).
        """
        args = self.hera_args
        device = reps.device
        if num_valid > 0:
            anchor_index = anchor_index.to(device, non_blocking=True)
            teacher_all = self._hera_teacher_features(pixel_values, pixel_keys, keys, counts.to(device), device)
            anchors = reps.index_select(1, anchor_index)
            anchor_teacher = teacher_all.index_select(0, anchor_index).float()
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
        if len(self.hera_queue) and total_anchors > 0:
            candidates = torch.cat([candidates, self.hera_queue.reps.to(device)], dim=1)
            candidate_teacher = torch.cat([candidate_teacher, self.hera_queue.teacher.to(device)])
        self.hera_queue.push(batch_reps, batch_teacher)  # after use: the queue holds earlier batches only
        num_candidates = candidates.shape[1]
        if total_anchors == 0 or num_candidates < 3:  # 2 candidates: the other one is the positive, no negative,
            return None, None  # so the loss would be exactly 0: not a HeRA term
        k = min(args.hera_k, num_candidates - 1)
        if k < args.hera_k and not self._hera_warned_small_batch:
            self._hera_warned_small_batch = True
            print(f"[llamafactory-hera] warning: only {num_candidates} candidates in a contrastive set, fewer than "
                  f"hera_k+1={args.hera_k + 1}; using k={k} for such batches.")
        anchor_index = offset + torch.arange(num_valid, device=device)
        temperature = used_temperature(self.hera_log_tau)
        per_anchor = hera_loss_anchored(anchors, candidates, anchor_index, anchor_teacher, candidate_teacher, k,
                                        temperature, args.hera_similarity)
        if gather:  # sum of local anchors scaled so that DDP's average over ranks is the global mean
            loss = per_anchor.sum() * (torch.distributed.get_world_size() / total_anchors) + 0.0 * candidates.sum()
        else:
            loss = per_anchor.mean()
        # Never let a NaN/inf reach the weights, and do not wait on the device to find out: the flag stays there
        # (counted in the stats and warned about at the next log), the loss becomes 0 and its gradient is zeroed
        # where it enters the model (the head representations) and the temperature.
        finite = torch.isfinite(loss)
        if gather:
            finite = all_ranks_all(finite)
        for entry in (reps, temperature):
            if entry.requires_grad:
                entry.register_hook(lambda grad: torch.where(finite, grad, torch.zeros_like(grad)))
        return torch.where(finite, loss, torch.zeros_like(loss)), finite

    def _trainer_divides_by_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``Trainer.training_step``'s rule for dividing the loss by the accumulation steps."""
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's input preparation, except for the teacher's pixels ``[N_img, C, H, W]``.

        Under DeepSpeed the Trainer casts every floating input to the engine's dtype (bf16): the teacher would see
        rounded pixels in the steps but float32 pixels when precomputing, and the features would differ. The pixels
        stay float32 on the CPU; the teacher moves them itself.
        """
        pixels = inputs.pop("hera_pixel_values", None) if hasattr(inputs, "pop") else None  # dict or BatchFeature
        prepared = super()._prepare_inputs(inputs)
        if pixels is not None:
            prepared["hera_pixel_values"] = pixels
        return prepared

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        pixel_values = inputs.pop("hera_pixel_values", None)
        pixel_keys = inputs.pop("hera_pixel_keys", None)
        counts = inputs.pop("hera_image_counts", None)
        keys = inputs.pop("hera_image_keys", None)
        token_mask = inputs.pop("hera_token_mask", None)
        anchor_index = inputs.pop("hera_anchor_index", None)
        sample_counts = inputs.pop("hera_sample_counts", None)
        if not model.training or counts is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if token_mask is None or anchor_index is None or sample_counts is None:
            raise RuntimeError("HeRA: the batch has no hera_token_mask / hera_anchor_index / hera_sample_counts; it "
                               "was not built by the HeRA collator after the HeRA trainer set it up.")
        num_valid, text_only, _ = (int(n) for n in sample_counts)
        if self._hera_last_logged_step is None:
            self._hera_last_logged_step = self.state.global_step
        self.hera_capture.arm()
        try:
            result = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            # LLaMA-Factory's ASFT path (use_asft_loss) returns the loss alone, whatever return_outputs says
            lm_loss, outputs = result if isinstance(result, tuple) else (result, None)
        finally:
            reps = self.hera_capture.disarm(pooling_weights(token_mask), check_gradient=torch.is_grad_enabled())
        if reps is None:
            raise RuntimeError("HeRA hooks did not fire: the model's o_proj modules were not called in the forward.")
        term, finite = self._hera_term(reps, pixel_values, pixel_keys, keys, counts, anchor_index, num_valid)
        if term is None:
            self.hera_summary.note_missing_term(num_valid, text_only, int(counts.numel()), self.state.global_step)
        # The Trainer divides the returned loss by the accumulation steps unless the model already normalised it
        # over the whole accumulated batch; in that case the HeRA term is divided here, so that both terms reach
        # backward with the same 1/accumulation weight.
        trainer_divides = self._trainer_divides_by_accumulation(num_items_in_batch)
        accumulation = 1 if trainer_divides else self.current_gradient_accumulation_steps
        total = lm_loss
        steps = self.current_gradient_accumulation_steps
        lm = lm_loss.detach().double() / (steps if trainer_divides else 1)
        device_part = None
        if term is not None:
            total = lm_loss + (self.hera_args.hera_lambda * term / accumulation).to(lm_loss.dtype)
            term_value, ok = term.detach().double(), finite.double()
            # what the term adds to the logged `loss`: lambda * term / accumulation steps, in every configuration
            device_part = torch.stack([lm, term_value, ok, 1.0 - ok, self.hera_args.hera_lambda * term_value / steps])
        self._hera_add_stats(device_part, lm, [num_valid, text_only, 1.0, float(term is None), float(term is not None)])
        self.hera_summary.micro_batches += 1
        return (total, outputs) if return_outputs else total

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in HERA_BATCH_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # ----------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: same decision on every rank, so the reduction is safe
            self._hera_log_values(logs)
            self._hera_monitor_merge(logs)
        super().log(logs, *args, **kwargs)
