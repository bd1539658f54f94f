"""HeRA's training step: ``loss = lm_loss + lambda * L_HeRA``, one class read top to bottom.

:class:`HeraTrainer` is mixed in front of LLaMA-Factory's ``CustomSeq2SeqTrainer`` (``hera/workflow.py``). One
optimizer step, from :meth:`HeraTrainer.compute_loss` to the loss value, reads in three files:

1. the batch (``hera/collator.py``): the model's inputs, the teacher's pixels or cache keys, the pooled-token mask and
   the anchors (samples with images and pooled tokens), all computed on the CPU;
2. the captured head inputs: the ordinary LM forward, with hooks on the selected heads' ``o_proj`` inputs armed
   (:class:`HeadCapture`, at the end of this file);
3. the projection: those inputs pooled over the mask and projected through each head's ``W_O`` columns
   (``HeadCapture.disarm``), ``[H, B, d]``;
4. the contrastive set (:meth:`HeraTrainer.hera_term`): this rank's anchors and their teacher features, the global
   batch under ``hera_gather``, the feature queue (``hera/loss.py``'s second part, the distributed candidate set);
5. the loss (``hera/loss.py``'s equations, pure), made 0 when not finite, scaled like the LM loss under gradient
   accumulation.

Inputs the step takes from helpers without their logic: the teacher's features (``teacher_run.RunTeacher.features``)
and the clamped temperature (``temperature.used_temperature``). Around the step, plain helpers the trainer calls: the
teacher's life cycle (``teacher_run``), checkpoint state (``checkpoint``), per-log sums and the run summary
(``run_summary``), the learnable temperature's gradient (``temperature.TemperatureGradHandler``) and the alignment
monitor (``monitor.MonitorCallback``), both callbacks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.heads.geometry import AttentionGeometry, HeadRef, attention_geometry
from llamafactory_hera.heads.pooling import multimodal_token_ids, pooling_weights, require_multimodal_ids
from llamafactory_hera.hera import checkpoint
from llamafactory_hera.hera.collator import HERA_BATCH_KEYS, collator_token_sources
from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.loss import (
    FeatureQueue,
    TemperatureGradHandler,
    all_ranks_all,
    distributed,
    gather_batch,
    hera_loss_anchored,
    used_temperature,
)
from llamafactory_hera.hera.monitor import MonitorCallback
from llamafactory_hera.hera.preflight import (
    check_heads_train,
    check_same_heads_on_every_rank,
    contrastive_geometry,
    trainable_upstream,
)
from llamafactory_hera.hera.projection import is_partitioned, project_heads, project_heads_by_call
from llamafactory_hera.hera.run_summary import HeraRunStats, StartLine
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.teacher_run import RunTeacher
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera.training.checkpoint_weights import RestoresCheckpointWeights
from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing

__all__ = ["HeraTrainer"]


class HeraTrainer(RestoresCheckpointWeights):
    """Mix in front of a Hugging Face ``Trainer`` subclass; pass ``hera_args=HeraArguments`` to ``__init__``."""

    def __init__(self, *args: Any, hera_args: HeraArguments,
                 hera_feature_cache: TeacherFeatureCache | None = None, hera_data_counts: Any = None,
                 hera_probe: Any = None, hera_recipe_args: Any = None, hera_auto_heads: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hera_args = hera_args
        model, device = self.model, self.args.device
        check_same_heads_on_every_rank(list(hera_args.hera_heads))
        geometry = attention_geometry(model.config)
        # before anything else loads: heads no trainable weight can move would train only the temperature
        check_heads_train(model, hera_args.head_refs, hera_auto_heads, getattr(self, "finetuning_args", None))
        self.hera_capture = HeadCapture(model, hera_args.head_refs, geometry)
        # the heads' layers non-reentrant (their hooks need autograd in the first forward), the others as recipe'd
        self.hera_checkpointing = LayerCheckpointing(model, [ref.layer for ref in hera_args.head_refs])
        self.hera_start = StartLine()  # before the monitor's callback: the start line comes before its step 0
        self.add_callback(self.hera_start)
        self.hera_teacher = RunTeacher(hera_args, hera_feature_cache, device)
        self.hera_contrastive = contrastive_geometry(hera_args, self.args.per_device_train_batch_size,
                                                     self.args.world_size,
                                                     getattr(hera_data_counts, "distinct_images", None))
        self.hera_queue = FeatureQueue(self.hera_contrastive.queue)
        self.hera_log_tau = nn.Parameter(
            torch.tensor(math.log(hera_args.hera_temperature), dtype=torch.float32, device=device),
            requires_grad=hera_args.hera_learn_temperature,
        )
        self.hera_temperature_lr = hera_args.hera_temperature_lr or self.args.learning_rate
        self.hera_tau = TemperatureGradHandler(self.hera_log_tau, self.hera_temperature_lr)
        if hera_args.hera_learn_temperature:
            self.add_callback(self.hera_tau)
            if getattr(self, "is_deepspeed_enabled", False):  # ZeRO's optimizer takes only the model's parameters
                self.hera_tau.own_optimizer = torch.optim.AdamW(
                    [self.hera_log_tau], lr=self.hera_temperature_lr, betas=(self.args.adam_beta1,
                    self.args.adam_beta2), eps=self.args.adam_epsilon, weight_decay=0.0)
        multimodal_ids = require_multimodal_ids(
            multimodal_token_ids(model.config, **collator_token_sources(self.data_collator)),
            str(getattr(model.config, "model_type", "?")))
        # the collator computes the pooled tokens and the anchors on the CPU (no host sync in the step)
        self.data_collator.hera_multimodal_ids = multimodal_ids
        self.data_collator.hera_pooling = hera_args.hera_pooling
        self.hera_stats = HeraRunStats(hera_args, hera_data_counts, device)
        self._hera_warned_small_batch = False
        self.hera_monitor = None  # hera_probe: monitor.ProbeSet, None when the monitor is off
        if hera_probe is not None:
            self.hera_monitor = MonitorCallback(self, hera_args, hera_probe, geometry, hera_recipe_args)
            self.add_callback(self.hera_monitor)

    # ----------------------------------------------------------------------------- the step
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The LM loss plus ``lambda * L_HeRA`` of this micro-batch (evaluation and HeRA-less batches: LM only)."""
        pixel_values, pixel_keys, counts, keys, token_mask, anchor_index, sample_counts = (
            inputs.pop(key, None) for key in HERA_BATCH_KEYS)  # what the collator added (hera/collator.py)
        if not model.training or counts is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if token_mask is None or anchor_index is None or sample_counts is None:
            raise RuntimeError("HeRA: the batch has no hera_token_mask / hera_anchor_index / hera_sample_counts; it "
                               "was not built by the HeRA collator after the HeRA trainer set it up.")
        num_valid, text_only = (int(n) for n in sample_counts)
        if self.hera_stats.last_logged_step is None:
            self.hera_stats.last_logged_step = self.state.global_step
        # 2-3. the LM forward with the heads' o_proj inputs captured, then pooled and projected: reps [H, B, d]
        self.hera_checkpointing.ensure()
        self.hera_capture.arm()
        try:
            result = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            # LLaMA-Factory's ASFT path (use_asft_loss) returns the loss alone, whatever return_outputs says
            lm_loss, outputs = result if isinstance(result, tuple) else (result, None)
        finally:
            reps = self.hera_capture.disarm(pooling_weights(token_mask), check_gradient=torch.is_grad_enabled())
        if reps is None:
            raise RuntimeError("HeRA hooks did not fire: the model's o_proj modules were not called in the forward.")
        # 4-5. the contrastive set and the HeRA loss
        term, finite = self.hera_term(reps, pixel_values, pixel_keys, keys, counts, anchor_index, num_valid)
        if term is None:
            self.hera_stats.note_missing_term(num_valid, text_only, int(counts.numel()), self.state.global_step)
        # The Trainer divides the returned loss by the accumulation steps unless the model already normalised it
        # over the whole accumulated batch; in that case the HeRA term is divided here, so that both terms reach
        # backward with the same 1/accumulation weight.
        trainer_divides = (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and \
            self.compute_loss_func is None  # Trainer.training_step's rule
        steps = self.current_gradient_accumulation_steps
        accumulation = 1 if trainer_divides else steps
        total = lm_loss
        lm = lm_loss.detach().double() / (steps if trainer_divides else 1)
        device_part = None
        if term is not None:
            total = lm_loss + (self.hera_args.hera_lambda * term / accumulation).to(lm_loss.dtype)
            term_value, ok = term.detach().double(), finite.double()
            # what the term adds to the logged `loss`: lambda * term / accumulation steps, in every configuration
            device_part = torch.stack([lm, term_value, ok, 1.0 - ok, self.hera_args.hera_lambda * term_value / steps])
        self.hera_stats.add(device_part, lm, [num_valid, text_only, 1.0, float(term is None), float(term is not None)])
        return (total, outputs) if return_outputs else total

    def hera_term(self, reps: torch.Tensor, pixel_values: torch.Tensor | None, pixel_keys: list[str] | None,
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
            teacher_all = self.hera_teacher.features(pixel_values, pixel_keys, keys, counts.to(device), device)
            anchors = reps.index_select(1, anchor_index)
            anchor_teacher = teacher_all.index_select(0, anchor_index).float()
        else:
            anchors = reps[:, :0]
            anchor_teacher = torch.zeros(0, self.hera_teacher.dim, device=device)
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

    # ----------------------------------------------------------------------------- around the step
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

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in HERA_BATCH_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer plus the learnable temperature in its own group (``hera_temperature_lr``)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.hera_tau.own_optimizer is not None:  # DeepSpeed: the temperature has its own optimizer
            return optimizer
        if self.hera_args.hera_learn_temperature and not any(
            p is self.hera_log_tau for group in optimizer.param_groups for p in group["params"]
        ):
            optimizer.add_param_group({"params": [self.hera_log_tau], "lr": self.hera_temperature_lr,
                                       "weight_decay": 0.0})
        return optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Start line (printed when training begins), the teacher's passes before step 1, the run, the end-of-run
        count."""
        main = self.is_world_process_zero()
        teacher = self.hera_teacher
        if main:
            monitor_line = self.hera_monitor.line() if self.hera_monitor is not None else (
                "alignment monitor off (" + ("hera_monitor_steps: 0" if self.hera_args.hera_monitor_steps == 0
                                             else "no probe pairs") + ")")
            precompute = teacher.precompute_decision(self.train_dataset, self.args)
            self.hera_start.line = lambda: self.hera_stats.start_line(  # printed when training begins (StartLine)
                self.hera_contrastive, self.hera_temperature_lr, self.args.world_size, precompute, monitor_line,
                self.hera_checkpointing.line())
        if self.hera_monitor is not None:  # the probe pairs' teacher features, before the teacher may leave the device
            self.hera_monitor.prepare_teacher(teacher.model, teacher.image_processor(self.data_collator))
        teacher.precompute(self.train_dataset, self.data_collator, self.args, main)
        try:
            result = super().train(*args, **kwargs)
            self.hera_stats.read(self.hera_log_tau, reduce=False)  # steps after the last log: checks, summary counts
            self.hera_stats.print_end(main)
            return result
        finally:
            teacher.to(teacher.device)  # the process-wide teacher goes back where load_teacher put it

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: same decision on every rank, so the reduction is safe
            self.hera_stats.log_values(logs, self.hera_log_tau, len(self.hera_queue) if self.hera_queue.capacity
                                       else None, self.state.global_step)
            if self.hera_monitor is not None:
                self.hera_monitor.merge(logs, self.state.global_step)
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------- checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            checkpoint.save_state(output_dir or self.args.output_dir, self.hera_args, self.hera_log_tau)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        checkpoint.save_optimizer_state(output_dir, self.hera_tau.own_optimizer, self.hera_queue,
                                        self.args.process_index, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint_dir: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint_dir)
        if checkpoint_dir is not None:
            checkpoint.load_state(checkpoint_dir, self.hera_args, self.hera_log_tau, self.hera_tau.own_optimizer,
                                  self.hera_queue, self.args.process_index, self.args.device)


# ----------------------------------------------------------------------------- the captured heads (steps 2-3)
class HeadCapture:
    """Forward hooks that produce ``[n_heads, B, d]`` head representations for one forward pass.

    A forward hook on each selected layer's ``o_proj`` copies the selected heads' slices of its input
    (``[B, T, n*d_head]``; slicing and concatenation save no tensors for backward, so gradient
    checkpointing's recomputation sees the same saved tensors with or without the hook). After the
    forward, the slices are pooled over the chosen tokens and projected through each head's ``W_O``
    columns, outside any checkpointed region, so the HeRA loss has a full autograd graph.
    Hooks act only while armed: recomputation during backward and evaluation forwards are ignored.
    """

    def __init__(self, model: nn.Module, heads: list[HeadRef], geometry: AttentionGeometry) -> None:
        self.heads = list(heads)
        self.geometry = geometry
        o_projs = head_projections(model)
        missing = sorted({ref.layer for ref in heads} - set(o_projs))
        if missing:
            raise ValueError(f"decoder layer(s) {missing} of the loaded model have no heads (layers with heads: "
                             f"{sorted(o_projs)}); the config's plan said {list(geometry.head_layers)}")
        self._by_layer: dict[int, list[int]] = defaultdict(list)
        for ref in self.heads:
            self._by_layer[ref.layer].append(ref.head)
        self._modules = {layer: o_projs[layer] for layer in self._by_layer}
        self._armed = False
        self._inputs: dict[int, torch.Tensor] = {}
        self.fed_by_trainable = trainable_upstream(model, sorted(self._by_layer))
        for layer in sorted(self._by_layer):
            self._modules[layer].register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: int):
        dh = self.geometry.head_dim_of(layer)
        slices = [slice(h * dh, (h + 1) * dh) for h in self._by_layer[layer]]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed:
                x = args[0]  # [B, T, H*dh]
                self._inputs[layer] = torch.cat([x[..., s] for s in slices], dim=-1)  # [B, T, n*dh], a copy

        return hook

    def arm(self) -> None:
        """Capture the next forward pass."""
        self._armed = True
        self._inputs = {}

    def disarm(self, weights: torch.Tensor, check_gradient: bool = False) -> torch.Tensor | None:
        """Stop capturing and build the representations.

        Args:
            weights: ``[B, T]`` float pooling weights (rows sum to 1, or 0 for samples without tokens).
            check_gradient: in a training step, raise if a captured input that trainable parameters feed
                carries no gradient (a silently cut HeRA gradient).

        Returns:
            ``[n_heads, B, d]`` float32 in recipe order, or None if no hook fired.
        """
        self._armed = False
        inputs, self._inputs = self._inputs, {}
        if not inputs:
            return None
        missing = sorted(set(self._by_layer) - set(inputs))
        if missing:
            raise RuntimeError(f"o_proj of layers {missing} did not run in this forward pass")
        # scanned on the checked steps only
        if check_gradient and (cut := [layer for layer, x in sorted(inputs.items())
                                       if self.fed_by_trainable[layer] and not x.requires_grad]):
            raise RecipeError(
                f"HeRA: the o_proj input of layer(s) {cut} carries no gradient although trainable parameters feed "
                "it, so the HeRA gradient would reach only the selected heads' W_O columns. The forward ran without "
                "autograd: a gradient checkpointing that runs that layer under torch.no_grad (use_unsloth_gc, or a "
                "custom checkpointing function HeRA cannot make non-reentrant) is the usual cause. "
                "Remove use_unsloth_gc / set use_reentrant_gc: false.")
        reps: dict[HeadRef, torch.Tensor] = {}
        for layer, x_heads in inputs.items():
            if x_heads.shape[:2] != weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x_heads.shape)} but the pooling mask is "
                    f"{tuple(weights.shape)}; the model changes the sequence length internally."
                )
            pooled = torch.einsum("bt,btc->bc", weights.to(x_heads.device, torch.float32), x_heads.float())
            heads = self._by_layer[layer]
            module = self._modules[layer]
            head_dim = self.geometry.head_dim_of(layer)
            if is_partitioned(module):  # DeepSpeed ZeRO-3: let the module's hooks gather its weights
                projected = project_heads_by_call(module, pooled, heads, head_dim, self.geometry.num_heads * head_dim)
            else:
                projected = project_heads(module, pooled, heads, head_dim)  # [n, B, d]
            reps.update({HeadRef(layer, h): rep for h, rep in zip(heads, projected, strict=True)})
        return torch.stack([reps[ref] for ref in self.heads])
