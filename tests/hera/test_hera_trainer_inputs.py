"""The Trainer's input preparation under DeepSpeed leaves the teacher's pixels and the pooling weights as they were
collated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from llamafactory_hera.hera.trainer import HeraTrainer
from llamafactory_hera.training.trainer_base import MethodTrainer


class _Trainer(HeraTrainer, MethodTrainer):
    """HeRA's step on the trainer base, as the workflow's class (the host's trainer is transformers')."""


def _deepspeed_bf16_trainer(cls: type) -> transformers.Trainer:
    """The state ``Trainer._prepare_input`` reads under DeepSpeed bf16 (nothing else is built)."""
    trainer = object.__new__(cls)
    trainer.args = SimpleNamespace(device=torch.device("cpu"), past_index=-1)
    trainer.is_deepspeed_enabled = True
    trainer.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
        hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))))
    return trainer


def _batch() -> dict:
    torch.manual_seed(0)
    return {"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.randn(4, 6),
            "hera_pixel_values": torch.randn(2, 3, 8, 8), "hera_pixel_keys": ["a", "b"],
            "hera_pooling_weights": torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3]])}


def test_teacher_pixels_stay_float32_when_deepspeed_casts_the_inputs() -> None:
    pixels = _batch()["hera_pixel_values"]
    stock = transformers.Trainer._prepare_inputs(_deepspeed_bf16_trainer(transformers.Trainer), _batch())
    assert stock["hera_pixel_values"].dtype == torch.bfloat16  # what the Trainer alone does (before the override)
    assert not torch.equal(stock["hera_pixel_values"].float(), pixels)
    ours = _deepspeed_bf16_trainer(_Trainer)._prepare_inputs(_batch())
    assert ours["hera_pixel_values"].dtype == torch.float32 and torch.equal(ours["hera_pixel_values"], pixels)
    assert ours["pixel_values"].dtype == torch.bfloat16  # the model's own inputs are prepared as before
    # the pooling weights in float32 too (bf16 rounds 1/3), on the device
    assert stock["hera_pooling_weights"].dtype == torch.bfloat16
    assert torch.equal(ours["hera_pooling_weights"], _batch()["hera_pooling_weights"])
    assert torch.equal(ours["input_ids"], stock["input_ids"]) and ours["hera_pixel_keys"] == ["a", "b"]


def test_a_forward_that_fails_keeps_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in the armed forward (an OOM in a head layer's lora_A after its base layer ran, under ZeRO-3) is the
    one raised, so that ``auto_find_batch_size`` and the user see it; the capture forgets that forward instead of
    building from its half (which would raise "were not seen in its call" on top of it)."""
    from llamafactory_hera.hera.collator import HERA_BATCH_KEYS

    calls: list[str] = []

    class _Capture:
        def arm(self) -> None:
            calls.append("arm")

        def drop(self) -> None:
            calls.append("drop")

        def disarm(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("HeRA: o_proj's [('lora_a', 'default')] were not seen in its call under ZeRO-3")

    def forward(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    trainer = object.__new__(_Trainer)
    trainer.hera_capture, trainer.hera_checkpointing = _Capture(), SimpleNamespace(ensure=lambda: None)
    trainer.hera_sums, trainer.state = SimpleNamespace(last_logged_step=0), SimpleNamespace(global_step=0)
    model = SimpleNamespace(training=True)
    batch = dict(zip(HERA_BATCH_KEYS, (None, None, torch.ones(1), [None], torch.full((1, 3), 1 / 3),
                                       torch.zeros(1, dtype=torch.long), [1, 0, 1]), strict=True))
    monkeypatch.setattr(transformers.Trainer, "compute_loss", forward)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        trainer.compute_loss(model, {"input_ids": torch.ones(1, 3), **batch})
    assert calls == ["arm", "drop"]


def test_a_nan_at_a_padded_position_leaves_a_micro_batch_without_a_term_finite(harc_assets: object,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A micro-batch without a HeRA term still sends zeros back through its heads' representations (so that every rank
    issues the same collectives under FSDP2): a NaN in a padded position's o_proj input, which the pooling weighs by
    0 (NaN), leaves the loss the LM loss, finite. The real capture and pooling on a tiny Llama, the NaN put in the
    last layer's o_proj input at row 1's padding (its logits there are shifted out of the LM loss)."""
    from transformers import AutoModelForCausalLM

    from llamafactory_hera.heads.geometry import HeadRef, attention_geometry
    from llamafactory_hera.heads.pooling import pooling_weights
    from llamafactory_hera.hera.capture import HeadCapture
    from llamafactory_hera.hera.collator import HERA_BATCH_KEYS
    from llamafactory_hera.hera.trainer import StepSums

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(harc_assets.models["llama3"]).train()
    layer = model.config.num_hidden_layers - 1

    def nan_at_padding(module: object, args: tuple) -> tuple:
        x = args[0].clone()
        x[1, -1] = float("nan")
        return (x, *args[1:])

    model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(nan_at_padding)
    trainer = object.__new__(_Trainer)
    trainer.hera_capture = HeadCapture(model, [HeadRef(layer, 0)], attention_geometry(model.config))
    trainer.hera_checkpointing, trainer.hera_term = SimpleNamespace(ensure=lambda: None), lambda *args: (None, None)
    trainer.hera_sums, trainer.state = StepSums(torch.device("cpu")), SimpleNamespace(global_step=0)
    trainer.model_accepts_loss_kwargs, trainer.compute_loss_func, trainer.current_gradient_accumulation_steps = \
        False, None, 1
    monkeypatch.setattr(transformers.Trainer, "compute_loss", lambda self, model, inputs, **kwargs: (
        model(**inputs).loss, None))
    ids, mask = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch = dict(zip(HERA_BATCH_KEYS, (None, None, torch.zeros(2), [None, None], pooling_weights(mask.bool()),
                                       torch.zeros(0, dtype=torch.long), [0, 2, 0]), strict=True))
    loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask,
                                        "labels": ids.masked_fill(mask == 0, -100), **batch})
    assert torch.isfinite(loss), loss
