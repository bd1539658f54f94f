"""HARC's step, in front of the trainer base. Per micro-batch::

    loss = w_couple couple + w_couple_resp couple_resp + w_kl KL + w_ce CE

from one forward with grad and, for the KL, one without grad and adapter on the retain rows. Terms: docs/harc.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import SchedulerType, Trainer, TrainerCallback
from typing_extensions import override

from llamafactory_hera.harc.batches import BATCH_KEYS, StreamEpochs
from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.data import ROLE_HARMFUL
from llamafactory_hera.harc.directions import Directions
from llamafactory_hera.harc.losses import coupling_loss, kl_to_reference, refusal_cross_entropy
from llamafactory_hera.harc.residuals import StepCapture, reading_layers, response_window
from llamafactory_hera.training import sections
from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing

if TYPE_CHECKING:  # a signature's type: the state is the workflow's to build
    from llamafactory_hera.harc.state import HarcState
    from llamafactory_hera.training.trainer_base import MethodTrainer as StepBase
else:  # a mixin: the workflow's class puts the trainer base (its hooks) after it
    StepBase = Trainer

_TERMS = ("couple", "couple_resp", "kl", "ce")


class AdapterSwitch:
    """The adapter layers, found once; :meth:`off` disables them as ``PeftModel.disable_adapter()`` does, minus its
    walk over every module and parameter (54 ms -> 7.6 ms a micro-batch on a 32-layer Llama)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            module for module in model.modules() if isinstance(module, BaseTunerLayer | AuxiliaryTrainingWrapper)
        ]

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)


class _StepEnd(TrainerCallback):
    """On every rank: base directions once the model is wrapped, ramp / refresh after each optimizer step."""

    def __init__(self, trainer: HarcTrainerMixin) -> None:
        self.trainer = trainer

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.resumed_from is None:  # else loaded (HarcTrainerMixin.load_method_state)
            with sections.section("HARC's direction extraction", "directions", forwards=True):
                trainer.harc_state.start(model)
            trainer.harc_run.say(f"HARC: base directions extracted; coupling layers {trainer.harc_state.layers}")
        # the recipe's checkpointing in every layer (the coupled layers' inputs keep their graph under reentrant
        # checkpointing too); only KV-sharing chains run non-reentrant, as their gradient needs
        trainer.harc_checkpointing = LayerCheckpointing(model, [], "HARC")
        trainer.harc_run.say(f"HARC: {trainer.harc_checkpointing.line()}")

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainer.harc_state.on_step_end(model, state.global_step, state.max_steps, trainer.harc_run.say)


class HarcTrainerMixin(StepBase):
    harc_args: HarcArguments
    harc_run: Any  # harc/workflow.py's RunContext, state included
    harc_state: HarcState  # directions and coupled layers
    harc_checkpointing: LayerCheckpointing  # set once the model is wrapped
    resumed_from: str | None  # the checkpoint this start resumed from
    _harc_sums: torch.Tensor  # [terms..., micro-batches] since the last log, on the device
    _harc_step_layers: list[int] | None = None  # the layers the last step coupled
    _harc_switch: tuple[nn.Module, AdapterSwitch] | None = None
    _harc_on_device: tuple[Any, torch.device, Directions] | None = None  # (state's directions, device, copy)
    _harc_weight_tensor: torch.Tensor | None = None  # the terms' weights on the device

    def __init__(self, *args: Any, harc_args: HarcArguments, harc_run: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.harc_args = harc_args
        self.harc_run = harc_run
        self.harc_state = harc_run.state
        self.model_accepts_loss_kwargs = False  # the Trainer divides by the accumulation steps, as the reference
        self._harc_sums = torch.zeros(len(_TERMS) + 1, dtype=torch.float64)
        self.add_callback(_StepEnd(self))
        self.add_callback(StreamEpochs(self.train_dataset))

    @override
    def save_method_state(self, folder: str, checkpoint: bool) -> None:
        """HARC's state into every checkpoint, ``save_only_model`` included: resume needs it."""
        if checkpoint and self.args.should_save:
            self.harc_state.save(folder)

    @override
    def load_method_state(self, folder: str) -> None:
        self.harc_state.load(folder)
        self.harc_run.say(f"HARC: resumed directions and layers {self.harc_state.layers} from {folder}")

    @override
    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """``constant_with_warmup`` as the reference's (``main/train.py`` ``lr_at``: ``lr * (step + 1) / warmup``):
        step ``k`` of ``W`` warm-up steps runs at ``k / W``. HF's runs ``k`` at ``(k - 1) / W``: a first update at rate
        0 leaves LoRA's B at 0. Other schedules are LLaMA-Factory's."""
        warmup = SchedulerType(self.args.lr_scheduler_type) == SchedulerType.CONSTANT_WITH_WARMUP
        if self.lr_scheduler is None and warmup:
            steps = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    @override
    def method_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        extras = {key: inputs.pop(key) for key in BATCH_KEYS if key in inputs}
        if not model.training or len(extras) != len(BATCH_KEYS):
            raise RuntimeError("stage: harc trains on its composed micro-batches only (no evaluation dataset).")
        args = self.harc_args
        state = self.harc_state
        self._harc_step_layers = list(state.layers)  # logged with this step (the state may change after it)
        labels = inputs.pop("labels")
        roles = extras["harc_role"]
        harmful = roles == ROLE_HARMFUL
        response = extras["harc_response_mask"]
        coupled_response = state.current.v_ref_resp is not None
        window = response_window(response, args.harc_response_tokens) if coupled_response else None
        capture = StepCapture(extras["harc_t_inst"], extras["harc_t_post"], window, require_grad=True)
        inner = self.accelerator.unwrap_model(model)
        self.harc_checkpointing.ensure()  # KV-sharing chains: the Trainer may have re-enabled reentrant checkpointing
        with reading_layers(inner, state.layers, capture):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        capture.read(state.layers)
        logits = outputs.logits
        directions = self._harc_directions(logits.device)
        couple = coupling_loss(
            capture.post, capture.inst, directions.v_ref, directions.v_harm, harmful, args.harc_margin
        )
        zero = logits.new_zeros((), dtype=torch.float32)
        couple_resp = zero
        if coupled_response:
            couple_resp = coupling_loss(
                capture.response,
                capture.response,
                directions.v_ref_resp,
                directions.v_harm_resp,
                harmful,
                args.harc_margin,
            )
        retain = extras["harc_retain_rows"]  # row indices from the collator: no nonzero (a host sync) in the step
        kl = zero
        if retain.numel():
            with torch.no_grad(), self._harc_adapters(inner).off():
                reference = inner(
                    input_ids=inputs["input_ids"][retain],
                    attention_mask=inputs["attention_mask"][retain],
                    use_cache=False,
                ).logits
            kl = kl_to_reference(logits[retain], reference, response[retain].to(logits.device))
        chosen = extras["harc_harmful_rows"]
        ce = refusal_cross_entropy(logits[chosen], labels[chosen]) if chosen.numel() else zero
        terms = torch.stack([couple.float(), couple_resp.float(), kl.float(), ce.float()])
        total = (self._harc_weights(terms.device) * terms).sum()
        # summed on the device: no host sync in the step (read at logging only)
        step = torch.cat([terms.detach().double(), terms.new_ones(1, dtype=torch.float64)])
        self._harc_sums = self._harc_sums.to(step.device) + step
        return (total, outputs) if return_outputs else total

    def _harc_adapters(self, inner: nn.Module) -> AdapterSwitch:
        if self._harc_switch is None or self._harc_switch[0] is not inner:
            self._harc_switch = (inner, AdapterSwitch(inner))
        return self._harc_switch[1]

    def _harc_directions(self, device: torch.device) -> Directions:
        """The state's directions on ``device``, copied in one transfer when they change."""
        current = self.harc_state.current
        cached = self._harc_on_device
        if cached is None or cached[0] is not current or cached[1] != device:
            tensors = current.tensors()
            moved = torch.stack(list(tensors.values())).to(device).unbind(0)  # [K, L, D] -> K x [L, D]
            cached = self._harc_on_device = (current, device, Directions(**dict(zip(tensors, moved, strict=True))))
        return cached[2]

    def _harc_weights(self, device: torch.device) -> torch.Tensor:
        cached = self._harc_weight_tensor
        if cached is None or cached.device != device:
            args = self.harc_args
            cached = self._harc_weight_tensor = torch.tensor(
                [args.harc_weight_couple, args.harc_weight_couple_resp, args.harc_weight_kl, args.harc_weight_ce],
                device=device,
            )
        return cached

    @override
    def method_logs(self, logs: dict[str, float]) -> None:
        """The terms' means since the last log, over every rank, and the logged step's layers."""
        sums = self._harc_sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = self.args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            sums = sums.to(device)
            with sections.collective("HARC's all-reduce of the logged sums"):
                torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        if sums[-1] > 0:
            for index, term in enumerate(_TERMS):
                logs[f"harc_{term}"] = float(sums[index] / sums[-1])
        # the logged step's layers: a ramp or refresh at its end has already changed the state's
        layers = self.harc_state.layers if self._harc_step_layers is None else self._harc_step_layers
        logs["harc_layers"] = ",".join(str(layer) for layer in layers)
        self._harc_sums.zero_()
