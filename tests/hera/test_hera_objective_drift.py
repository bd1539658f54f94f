"""Smaller ways the objective could drift without a word: a cut gradient, the temperature's range, the queue
switched on by one ragged batch, LoRA dropout in one projection path and not the other."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe
from llamafactory_hera.runtime.errors import RecipeError


def _tiny_lora_model(assets, family: str, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(assets.models[family])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, config)


def _forward(model, capture, no_grad_layers: bool) -> torch.Tensor | None:
    from llamafactory_hera.heads.architecture import text_decoder
    from llamafactory_hera.heads.pooling import pooling_weights

    layers = text_decoder(model).layers
    originals = [layer.forward for layer in layers]
    if no_grad_layers:  # what use_unsloth_gc / reentrant checkpointing do to each layer's first forward
        for layer, forward in zip(layers, originals, strict=True):
            layer.forward = (lambda f: lambda *a, **k: (torch.no_grad()(f))(*a, **k))(forward)
    ids = torch.randint(3, 50, (2, 6))
    capture.arm()
    try:
        text_decoder(model)(input_ids=ids)
    finally:
        for layer, forward in zip(layers, originals, strict=True):
            layer.forward = forward
    return capture.disarm(pooling_weights(torch.ones(2, 6, dtype=torch.bool)), check_gradient=True)


def test_a_cut_gradient_below_the_captured_heads_is_an_error(assets) -> None:
    from llamafactory_hera.heads.geometry import HeadRef, attention_geometry
    from llamafactory_hera.hera.capture import HeadCapture

    model = _tiny_lora_model(assets, "qwen2_5_vl", ["q_proj", "v_proj", "o_proj"])
    capture = HeadCapture(model, [HeadRef(1, 0)], attention_geometry(model.config))
    assert capture.fed_by_trainable == {1: True}
    reps = _forward(model, capture, no_grad_layers=False)
    assert reps is not None and reps.requires_grad
    with pytest.raises(RecipeError, match=r"layer\(s\) \[1\] carries no gradient.*use_unsloth_gc"):
        _forward(model, capture, no_grad_layers=True)


def test_heads_fed_by_nothing_trainable_are_not_an_error(assets) -> None:
    """LoRA on o_proj only, a head of layer 0: nothing trainable feeds its input; HeRA trains its W_O columns."""
    from llamafactory_hera.heads.geometry import HeadRef, attention_geometry
    from llamafactory_hera.hera.capture import HeadCapture

    model = _tiny_lora_model(assets, "qwen2_5_vl", ["o_proj"])
    capture = HeadCapture(model, [HeadRef(0, 1), HeadRef(1, 0)], attention_geometry(model.config))
    assert capture.fed_by_trainable == {0: False, 1: True}


def test_projection_by_call_ignores_lora_dropout_like_the_weight_path() -> None:
    """ZeRO-3 reads o_proj's weights in its calls, DDP through the effective weight: with lora_dropout > 0 in training
    mode both must give the same head representations."""
    from peft import LoraConfig, get_peft_model

    from llamafactory_hera_testing.projection import project_heads
    from llamafactory_hera_testing.zero3 import project_in_call

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.o_proj = torch.nn.Linear(12, 8, bias=True)
    model = get_peft_model(holder, LoraConfig(r=2, target_modules=["o_proj"], lora_dropout=0.5,
                                              init_lora_weights=False))
    model.train()
    o_proj = model.base_model.model.o_proj
    pooled = torch.randn(5, 2 * 4)
    by_weight = project_heads(o_proj, pooled, [0, 2], 4)
    by_call = project_in_call(o_proj, pooled, [0, 2], 4)[0]
    torch.testing.assert_close(by_call, by_weight)
    assert all(module.training for module in o_proj.lora_dropout.values())  # mode restored


def test_temperature_is_clamped_where_used_and_after_each_step() -> None:
    from llamafactory_hera.hera.loss import TAU_MAX, TAU_MIN, TemperatureGradHandler, used_temperature

    assert float(used_temperature(torch.tensor(math.log(1e-4)))) == pytest.approx(TAU_MIN)
    assert float(used_temperature(torch.tensor(math.log(1e4)))) == pytest.approx(TAU_MAX)
    log_tau = torch.nn.Parameter(torch.tensor(math.log(0.07)))
    value = used_temperature(log_tau)
    value.backward()
    assert log_tau.grad is not None and float(log_tau.grad) == pytest.approx(0.07)
    handler = TemperatureGradHandler(log_tau, 1e-3)
    with torch.no_grad():
        log_tau.fill_(math.log(1e-3))
    handler.on_optimizer_step(None, None, None)
    assert float(log_tau) == pytest.approx(math.log(TAU_MIN)) and log_tau.grad is None


def test_one_ragged_batch_does_not_switch_the_queue_on(assets, tmp_path: Path) -> None:
    """32 rows in batches of 5 with k=3: the epoch's last batch holds 2 samples. The queue stays off (it used to
    switch on there for the rest of the run). That batch has no negative, so it has no HeRA term and is counted."""
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", per_device_train_batch_size=5, max_steps=8)
    probe = LogProbe()
    with contextlib.redirect_stdout(None):
        run_exp(recipe, callbacks=[probe])
    assert len(probe.logs) == 8
    assert all("hera_queue_size" not in logs for logs in probe.logs)
    assert probe.logs[6]["hera_image_samples"] == 2 and "hera_loss" not in probe.logs[6]  # 2 samples: no negative
    assert probe.logs[6]["hera_batches_without_term"] == 1
