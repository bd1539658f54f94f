"""The host stack training on the simulated accelerator (:mod:`.accelerator`): transformers, accelerate and
LLaMA-Factory made to place a run there as on a GPU (:func:`patch_for_simulated_device`), accelerate's process-wide
state forgotten afterwards, and the host syncs of each optimizer step counted (:class:`StepSyncs`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llamafactory_hera_testing.accelerator import DEVICE, SimulatedAccelerator, means_device


def patch_for_simulated_device(monkeypatch: Any, accelerator: SimulatedAccelerator) -> None:
    """Make the host stack place work on the simulated accelerator, as it places it on a GPU.

    * ``TrainingArguments.device`` and accelerate's device report ``DEVICE``: the Trainer moves the model and
      every batch there (``_move_model_to_device``, ``_prepare_inputs``);
    * LLaMA-Factory's ``get_current_device`` reports it, so ``device_map={"": DEVICE}`` reaches model loading;
    * ``PreTrainedModel.from_pretrained`` loads on the CPU with plain semantics (transformers uses ``meta`` for
      its empty weights) and then moves the model to ``DEVICE`` when the device map names it, as a GPU load
      places it;
    * the fused AdamW the Trainer picks by default accepts the device (its CPU kernel computes).

    Saving works as on a GPU: safetensors copies a non-CPU tensor to the host before writing it.
    """
    import accelerate.state
    import torch.optim.optimizer as optimizer_module
    import transformers

    monkeypatch.setattr(transformers.TrainingArguments, "device",
                        property(lambda self: (self._setup_devices, DEVICE)[1]))

    def keep(self: Any, value: Any) -> None:  # the state's own device, read again once the patch is undone
        self.__dict__["device"] = value

    for state in (accelerate.state.PartialState, accelerate.state.AcceleratorState):
        monkeypatch.setattr(state, "device", property(lambda self: DEVICE, keep), raising=False)
    fused = optimizer_module._get_fused_kernels_supported_devices
    monkeypatch.setattr(optimizer_module, "_get_fused_kernels_supported_devices", lambda: [*fused(), DEVICE.type])

    # Import every module that binds get_current_device by name BEFORE patching: one first imported under the patch
    # would bind the patched function, and monkeypatch would then "restore" it to that (a later CPU run would load
    # its model on the simulated device).
    import llamafactory.extras.misc
    import llamafactory.hparams.parser
    import llamafactory.model.loader
    import llamafactory.model.model_utils.quantization
    import llamafactory.model.model_utils.unsloth
    import llamafactory.model.patcher

    model_utils = llamafactory.model.model_utils
    for module in (llamafactory.extras.misc, llamafactory.hparams.parser, model_utils.quantization,
                   model_utils.unsloth, llamafactory.model.loader, llamafactory.model.patcher):
        if hasattr(module, "get_current_device"):
            monkeypatch.setattr(module, "get_current_device", lambda: DEVICE)

    load = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        device_map = kwargs.pop("device_map", None)
        wanted = device_map.get("") if isinstance(device_map, dict) else device_map
        if wanted == "auto":  # inference loading (get_infer_args): on one GPU accelerate's map puts it all there
            wanted = DEVICE
        if wanted is not None and not means_device(wanted):
            kwargs["device_map"] = device_map
        if SimulatedAccelerator.current is not accelerator:
            return load(cls, *args, **kwargs)
        with accelerator.paused():
            model = load(cls, *args, **kwargs)
        return model.to(DEVICE) if wanted is not None and means_device(wanted) else model

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that no device set up under the patches outlives them."""
    import accelerate.state

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


class StepSyncs:
    """A ``TrainerCallback`` counting host syncs per optimizer step, from one step's start to the next's
    (so a step's logging is in it). ``steps`` holds ``(global_step, logged, Counter)``; ``where`` the frames;
    ``waits`` each step's ``SimulatedAccelerator.waits`` (where in the step each sync fell) and ``ops`` its ops."""

    def __init__(self, accelerator: SimulatedAccelerator) -> None:
        self.accelerator = accelerator
        self.steps: list[tuple[int, bool, Counter[str]]] = []
        self.where: list[str] = []
        self.copy_sources: list[list[tuple[int, str]]] = []  # per step, SimulatedAccelerator.copy_sources
        self.waits: list[list[tuple[str, int, str]]] = []
        self.ops: list[int] = []
        self._step = 0

    def _close(self, state: Any, args: Any) -> None:
        if self._step:
            logged = args.logging_steps > 0 and self._step % args.logging_steps == 0
            self.steps.append((self._step, logged, Counter(self.accelerator.counts)))
            self.where.append(self.accelerator.report())
            self.copy_sources.append(list(self.accelerator.copy_sources))
            self.waits.append(list(self.accelerator.waits))
            self.ops.append(self.accelerator.ops)
        self.accelerator.reset()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._close(state, args)
        self._step = state.global_step + 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._close(state, args)
        self._step = 0

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
