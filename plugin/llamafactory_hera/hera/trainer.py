"""HeRA's training step: ``loss = lm_loss + lambda * L_HeRA``, in front of the trainer base.

One step: the batch, built on the CPU (``hera/collator.py``); the LM forward with the heads' ``o_proj`` inputs
captured, pooled and projected through ``W_O`` (``[H, B, d]``); the contrastive set (local anchors, the global batch
under ``hera_gather``, the queue); the loss, 0 when not finite, scaled like the LM loss under gradient accumulation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from typing_extensions import override

from llamafactory_hera.heads.geometry import AttentionGeometry, attention_geometry
from llamafactory_hera.heads.pooling import multimodal_token_ids, require_multimodal_ids
from llamafactory_hera.hera.capture import HeadCapture
from llamafactory_hera.hera.collator import HERA_BATCH_KEYS, collator_token_sources
from llamafactory_hera.hera.loss import (
    FeatureQueue,
    TemperatureGradHandler,
    all_ranks_all,
    distributed,
    gather_batch,
    hera_loss_anchored,
    used_temperature,
)
from llamafactory_hera.hera.step_sums import StepSums
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.teacher_run import RunTeacher
from llamafactory_hera.runtime.log import line
from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing

if TYPE_CHECKING:  # the arguments' declaration and the monitor are the workflow's to load, not the step's
    from llamafactory_hera.hera.config import HeraArguments
    from llamafactory_hera.hera.monitor import MonitorCallback
    from llamafactory_hera.training.trainer_base import MethodTrainer as StepBase
else:  # a mixin: the workflow's class puts the trainer base (its hooks, the host's loss) after it
    StepBase = Trainer

__all__ = ["HeraTrainer", "StepSums"]


class HeraTrainer(StepBase):
    """HeRA's step. ``hera_queue``: the queue's capacity (``preparation_checks.contrastive_geometry``)."""

    hera_args: HeraArguments
    hera_geometry: AttentionGeometry
    hera_capture: HeadCapture  # hooks on the heads' o_proj inputs
    hera_checkpointing: LayerCheckpointing  # each layer's recomputation in backward
    hera_teacher: RunTeacher
    hera_queue: FeatureQueue  # earlier batches' features (capacity 0: off)
    hera_log_tau: nn.Parameter  # log of the contrastive temperature
    hera_temperature_lr: float
    hera_tau: TemperatureGradHandler  # the temperature's step (own optimizer under DeepSpeed, FSDP)
    hera_sums: StepSums
    hera_monitor: MonitorCallback | None = None  # its point joins the step's log
    _hera_warned_small_batch: bool

    def __init__(
        self,
        *args: Any,
        hera_args: HeraArguments,
        hera_feature_cache: TeacherFeatureCache | None,
        hera_queue: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.hera_args = hera_args
        model = self.model
        device = self.args.device
        self.hera_geometry = attention_geometry(model.config)
        self.hera_capture = HeadCapture(model, hera_args.hera_heads, self.hera_geometry)
        # the hooks need autograd: a reentrant heads' layer hands inputs out of its checkpoint; under ZeRO-3 it turns
        # non-reentrant (a quantized model is partitioned only at train start, so the engine's flag counts too)
        capture = self.hera_capture
        zero3 = capture.copies_in_call or is_deepspeed_zero3_enabled()
        self.hera_checkpointing = LayerCheckpointing(
            model, [ref.layer for ref in hera_args.hera_heads], reentrant=None if zero3 else capture.checkpointed
        )
        self.hera_teacher = RunTeacher(hera_args, hera_feature_cache, device)
        self.hera_queue = FeatureQueue(hera_queue)
        self.hera_log_tau = nn.Parameter(
            torch.tensor(math.log(hera_args.hera_temperature), dtype=torch.float32, device=device),
            requires_grad=hera_args.hera_learn_temperature,
        )
        self.hera_temperature_lr = hera_args.hera_temperature_lr or self.args.learning_rate
        self.hera_tau = TemperatureGradHandler(self.hera_log_tau, self.hera_temperature_lr)
        if hera_args.hera_learn_temperature:
            self.add_callback(self.hera_tau)
            # ZeRO's optimizer takes only model parameters; FSDP2 maps every optimizer parameter to a model one
            # (else a KeyError in fsdp2_switch_optimizer_parameters)
            if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
                self.hera_tau.own_optimizer = torch.optim.AdamW(
                    [self.hera_log_tau],
                    lr=self.hera_temperature_lr,
                    betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                    weight_decay=0.0,
                )
        multimodal_ids = require_multimodal_ids(
            multimodal_token_ids(model.config, **collator_token_sources(self.data_collator)),
            str(getattr(model.config, "model_type", "?")),
        )
        # the collator finds pooled tokens and anchors on the CPU (no host sync in the step)
        self.data_collator.hera_multimodal_ids = multimodal_ids
        self.data_collator.hera_pooling = hera_args.hera_pooling
        self.hera_sums = StepSums(device)
        self._hera_warned_small_batch = False

    # --- the step
    @override
    def method_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """LM loss plus ``lambda * L_HeRA`` (evaluation and HeRA-less batches: LM only)."""
        pixel_values, pixel_keys, counts, keys, pooling, anchor_index, sample_counts = (
            inputs.pop(key, None) for key in HERA_BATCH_KEYS
        )  # added by hera/collator.py
        if not model.training or counts is None:
            return self.host_loss(model, inputs, return_outputs, num_items_in_batch)
        if pooling is None or anchor_index is None or sample_counts is None:
            raise RuntimeError(
                "HeRA: the batch has no hera_pooling_weights / hera_anchor_index / hera_sample_counts; it "
                "was not built by the HeRA collator after the HeRA trainer set it up."
            )
        num_valid, text_only, one_each = (int(n) for n in sample_counts)
        if self.hera_sums.last_logged_step is None:
            self.hera_sums.last_logged_step = self.state.global_step
        # 2-3. LM forward, heads' o_proj inputs captured, pooled and projected: reps [H, B, d]
        self.hera_checkpointing.ensure()
        self.hera_capture.arm()
        try:
            result = self.host_loss(model, inputs, True, num_items_in_batch)
        except BaseException:  # the forward's own error (an OOM...) is the one raised
            self.hera_capture.drop()
            raise
        # LLaMA-Factory's ASFT path (use_asft_loss) returns the loss alone, whatever return_outputs
        lm_loss, outputs = result if isinstance(result, tuple) else (result, None)
        reps = self.hera_capture.disarm(pooling, check_gradient=torch.is_grad_enabled())
        if reps is None:
            raise RuntimeError("HeRA hooks did not fire: the model's o_proj modules were not called in the forward.")
        # 4-5. the contrastive set and the HeRA loss
        features = (  # the teacher runs only for a batch with anchors
            self.hera_teacher.features(pixel_values, pixel_keys, keys, counts, reps.device, bool(one_each))
            if num_valid > 0
            else None
        )
        term, finite = self.hera_term(reps, features, anchor_index, num_valid)
        if term is None:
            self.hera_sums.note_missing_term(num_valid, text_only, int(counts.numel()), self.state.global_step)
            # FSDP2 gathered the heads' columns for reps: a zero backward keeps every rank's collectives equal
            lm_loss = lm_loss + (reps.nan_to_num() * 0.0).sum().to(lm_loss.dtype) if reps.requires_grad else lm_loss
        # The Trainer divides the loss by the accumulation steps unless the model normalised it over the whole
        # accumulated batch; then the HeRA term is divided here, so both terms get the same 1/accumulation weight.
        trainer_divides = (
            not self.model_accepts_loss_kwargs or num_items_in_batch is None
        ) and self.compute_loss_func is None  # Trainer.training_step's rule
        steps = self.current_gradient_accumulation_steps
        accumulation = 1 if trainer_divides else steps
        total = lm_loss
        weight = (0.0, steps)
        if term is not None:
            weight = (self.hera_args.hera_lambda, steps)
            weighted = self.hera_args.hera_lambda * term
            if accumulation != 1:  # skip a no-op launch
                weighted = weighted / accumulation
            total = lm_loss + weighted.to(lm_loss.dtype)
        # the term adds lambda * term / accumulation steps to the logged `loss`
        self.hera_sums.add(
            lm_loss,
            steps if trainer_divides else 1,
            term,
            finite,
            weight,
            [num_valid, text_only, 1.0, float(term is None), float(term is not None)],
        )
        return (total, outputs) if return_outputs else total

    def hera_term(
        self, reps: torch.Tensor, features: torch.Tensor | None, anchor_index: torch.Tensor, num_valid: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(loss, finite)``, or ``(None, None)`` when the batch has no term.

        ``loss``: 0-d float32 loss of this rank's ``num_valid`` anchors against the global batch (``hera_gather``)
        plus the queue; 0, with no gradient, if not finite on any rank. ``finite``: 0-d device bool. ``features``:
        teacher ``[B, E]`` (None without anchors). Collectives are decided on global quantities, so ranks agree; only
        the anchor-count exchange (:func:`gather_batch`) waits on the device."""
        args = self.hera_args
        device = reps.device
        if features is not None and num_valid == reps.shape[1]:  # all samples anchors: no selection
            anchors = reps
            anchor_teacher = features.float()
        elif features is not None:
            anchor_index = anchor_index.to(device, non_blocking=True)
            anchors = reps.index_select(1, anchor_index)
            anchor_teacher = features.index_select(0, anchor_index).float()
        else:
            anchors = reps[:, :0]
            anchor_teacher = torch.zeros(0, self.hera_teacher.dim, device=device)
        gather = args.hera_gather and distributed()
        if gather:
            candidates, candidate_teacher, offset, sizes = gather_batch(anchors, anchor_teacher)
            total_anchors = sum(sizes)
        else:
            candidates = anchors
            candidate_teacher = anchor_teacher
            offset = 0
            total_anchors = num_valid
        # pushed detached (FeatureQueue.push)
        batch_reps = candidates
        batch_teacher = candidate_teacher
        if len(self.hera_queue) and total_anchors > 0:
            candidates = torch.cat([candidates, self.hera_queue.reps.to(device)], dim=1)
            candidate_teacher = torch.cat([candidate_teacher, self.hera_queue.teacher.to(device)])
        self.hera_queue.push(batch_reps, batch_teacher)  # after use: the queue holds earlier batches only
        num_candidates = candidates.shape[1]
        if total_anchors == 0 or num_candidates < 3:  # 2 candidates: a positive, no negative, loss exactly 0
            return None, None
        k = min(args.hera_k, num_candidates - 1)
        if k < args.hera_k and not self._hera_warned_small_batch:
            self._hera_warned_small_batch = True
            print(
                line(
                    f"warning: only {num_candidates} candidates in a contrastive set, fewer than "
                    f"hera_k+1={args.hera_k + 1}; using k={k} for such batches."
                )
            )
        # anchors' places among the candidates (None: the first, when no other rank's come before)
        positions = offset + torch.arange(num_valid, device=device) if offset else None
        temperature = used_temperature(self.hera_log_tau)
        per_anchor = hera_loss_anchored(
            anchors, candidates, positions, anchor_teacher, candidate_teacher, k, temperature, args.hera_similarity
        )
        if gather:  # scaled so DDP's average over ranks is the global mean
            loss = per_anchor.sum() * (torch.distributed.get_world_size() / total_anchors) + 0.0 * candidates.sum()
        else:
            loss = per_anchor.mean()
        # A NaN/inf never reaches the weights, without a sync: the flag stays on the device (warned at the next log),
        # the loss becomes 0 and its gradient is zeroed at the head representations and the temperature.
        finite = loss.abs() < math.inf  # torch.isfinite in 2 ops, not 4 (NaN and inf compare False)
        if gather:
            finite = all_ranks_all(finite)
        failed = finite.logical_not()
        for entry in (reps, temperature):
            if entry.requires_grad:
                entry.register_hook(lambda grad: grad.masked_fill(failed, 0.0))
        return loss.masked_fill(failed, 0.0), finite

    # --- around the step
    @override
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's input preparation, except for the teacher's pixels ``[N_img, C, H, W]`` and the pooling
        weights ``[B, T]``: DeepSpeed's cast to bf16 would change the teacher's features and round the ``1 / n``
        weights."""
        has_pop = hasattr(inputs, "pop")  # dict or BatchFeature
        pixels = inputs.pop("hera_pixel_values", None) if has_pop else None
        pooling = inputs.pop("hera_pooling_weights", None) if has_pop else None
        prepared = super()._prepare_inputs(inputs)
        if pixels is not None:
            prepared["hera_pixel_values"] = pixels
        if pooling is not None:
            prepared["hera_pooling_weights"] = pooling.to(self.args.device)
        return prepared

    @override
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in HERA_BATCH_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    @override
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer plus the learnable temperature in its own group (``hera_temperature_lr``)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.hera_tau.own_optimizer is not None:  # DeepSpeed, FSDP: it has its own optimizer
            return optimizer
        if self.hera_args.hera_learn_temperature and not any(
            p is self.hera_log_tau for group in optimizer.param_groups for p in group["params"]
        ):
            optimizer.add_param_group(
                {"params": [self.hera_log_tau], "lr": self.hera_temperature_lr, "weight_decay": 0.0}
            )
        return optimizer

    @override
    def method_logs(self, logs: dict[str, float]) -> None:
        """The monitor's point, then the step's sums since the last log (the same on every rank)."""
        if self.hera_monitor is not None:
            self.hera_monitor.merge(logs, self.state.global_step)
        self.hera_sums.log_values(
            logs,
            self.hera_log_tau,
            len(self.hera_queue) if self.hera_queue.capacity else None,
            self.state.global_step,
        )
