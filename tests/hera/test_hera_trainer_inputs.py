"""The Trainer's input preparation under DeepSpeed leaves the teacher's pixels as they were collated."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers

from llamafactory_hera.hera.trainer import HeraTrainer


class _Trainer(HeraTrainer, transformers.Trainer):
    pass


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
            "hera_pixel_values": torch.randn(2, 3, 8, 8), "hera_pixel_keys": ["a", "b"]}


def test_teacher_pixels_stay_float32_when_deepspeed_casts_the_inputs() -> None:
    pixels = _batch()["hera_pixel_values"]
    stock = transformers.Trainer._prepare_inputs(_deepspeed_bf16_trainer(transformers.Trainer), _batch())
    assert stock["hera_pixel_values"].dtype == torch.bfloat16  # what the Trainer alone does (before the override)
    assert not torch.equal(stock["hera_pixel_values"].float(), pixels)
    ours = _deepspeed_bf16_trainer(_Trainer)._prepare_inputs(_batch())
    assert ours["hera_pixel_values"].dtype == torch.float32 and torch.equal(ours["hera_pixel_values"], pixels)
    assert ours["pixel_values"].dtype == torch.bfloat16  # the model's own inputs are prepared as before
    assert torch.equal(ours["input_ids"], stock["input_ids"]) and ours["hera_pixel_keys"] == ["a", "b"]
