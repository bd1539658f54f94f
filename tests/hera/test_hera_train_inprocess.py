"""HeRA through LLaMA-Factory's real `run_exp` in this process: gradient flow and argument errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from conftest import base_recipe
from llamafactory_hera.heads.architecture import head_projections


class GradientProbe(TrainerCallback):
    """Copies the o_proj gradients (full weight, or LoRA A) of every layer before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.grads:
            return
        for layer, o_proj in head_projections(model).items():
            weight = o_proj.lora_A["default"].weight if hasattr(o_proj, "lora_A") else o_proj.weight
            self.grads[layer] = weight.grad.detach().clone()


def _nonzero_adapter(assets, family: str, path: Path) -> Path:
    """A LoRA adapter on o_proj with random (non-zero) A and B, so both receive gradient at step 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(assets.models[family])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def _run(recipe: dict[str, Any]) -> dict[int, torch.Tensor]:
    from llamafactory.train.tuner import run_exp

    probe = GradientProbe()
    run_exp(recipe, callbacks=[probe])
    return probe.grads


@pytest.mark.parametrize("finetuning", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", ["default", "off"])
def test_hera_gradient_reaches_selected_heads_only(assets, tmp_path: Path, finetuning: str, checkpointing: str) -> None:
    """The HeRA part of the gradient (lambda=1 minus lambda=0, same seed and batch) on the selected layer's o_proj:
    non-zero in the columns of the selected heads, exactly zero in every other head's columns.

    "default" keeps LLaMA-Factory's default (reentrant) gradient checkpointing setting, under which hooked
    activations would be detached; the plugin must still produce this gradient.
    """
    extra: dict[str, Any] = {"disable_gradient_checkpointing": True} if checkpointing == "off" else {}
    if finetuning == "lora":  # continue training an adapter whose B is non-zero (fresh LoRA has B = 0)
        extra["adapter_name_or_path"] = str(_nonzero_adapter(assets, "qwen2_5_vl", tmp_path / "adapter"))
    common = dict(finetuning_type=finetuning, lora_target="o_proj", max_steps=1, hera_heads=["L1H0", "L1H2"],
                  learning_rate=1e-3, max_grad_norm=0.0, **extra)  # clipping would rescale every column
    with_hera = _run(base_recipe(assets, "qwen2_5_vl", tmp_path / "a", hera_lambda=1.0, **common))
    without = _run(base_recipe(assets, "qwen2_5_vl", tmp_path / "b", hera_lambda=0.0, **common))
    head_dim = 16
    hera_part = (with_hera[1] - without[1]).abs()  # [d, H*dh] (full) or [r, H*dh] (LoRA A)
    per_head = hera_part.unflatten(-1, (4, head_dim)).sum(dim=(0, 2))  # [H]
    assert per_head[0] > 1e-6 and per_head[2] > 1e-6, per_head
    assert per_head[1] == 0 and per_head[3] == 0, per_head
    # The LM part is identical in both runs, so lambda=0 really is plain SFT's gradient.
    assert torch.equal(with_hera[1].unflatten(-1, (4, head_dim))[..., 1, :],
                       without[1].unflatten(-1, (4, head_dim))[..., 1, :])


@pytest.mark.parametrize("overrides,message", [
    ({"hera_lamda": 0.1}, "Unknown HeRA key 'hera_lamda'. Did you mean 'hera_lambda'?"),
    ({"hera_k": 0}, "hera_k: got 0; allowed range is >= 1"),
    ({"hera_heads": None}, "hera_heads: missing"),
    ({"hera_heads": ["L0H9"]}, "hera_heads: L0H9 is outside"),
    ({"packing": True}, "stage: hera cannot run with packing: true"),
    ({"neat_packing": True}, "stage: hera cannot run with neat_packing: true"),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "stage: hera reads W_O per head, and quantization_bit: 4 "
     "with quantization_method: hqq cannot be read exactly: hqq stores packed codes"),
    ({"quantization_bit": 4, "use_dora": True}, "use_dora: true with 4-bit bitsandbytes weights: LLaMA-Factory 0.9.5 "
     "refuses DoRA on every quantized model"),
    ({"use_hyper_parallel": True}, "stage: hera cannot run with use_hyper_parallel: true"),
    ({"galore_layerwise": True}, "stage: hera cannot run with galore_layerwise: true"),
    ({"hera_teacher": "/nonexistent/teacher"}, "hera_teacher: folder '/nonexistent/teacher' does not exist"),
])
def test_bad_input_fails_before_loading(assets, tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    from llamafactory.train.tuner import run_exp

    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", **given)
    for key in (k for k, v in overrides.items() if v is None):
        recipe.pop(key)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        run_exp(recipe)
    assert not (tmp_path / "out").exists()


def test_teacher_must_be_a_vision_encoder(assets, tmp_path: Path) -> None:
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_teacher=str(assets.models["qwen2_5_vl"]))
    with pytest.raises(ValueError, match="hera_teacher: .* is a 'qwen2_5_vl' model, not a vision encoder"):
        run_exp(recipe)


class LogProbe(TrainerCallback):
    """Keeps every training log dict."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def test_optional_settings_train(assets, tmp_path: Path) -> None:
    """Frozen temperature, mean-of-patches teacher feature, raw dot similarity and all-text pooling."""
    from llamafactory.train.tuner import run_exp

    probe = LogProbe()
    recipe = base_recipe(assets, "qwen3_vl", tmp_path / "out", hera_learn_temperature=False,
                         hera_teacher_feature="mean", hera_similarity="dot", hera_pooling="text", hera_temperature=2.0)
    run_exp(recipe, callbacks=[probe])
    assert len(probe.logs) == 3
    for logs in probe.logs:
        assert logs["hera_temperature"] == pytest.approx(2.0, abs=1e-6)
        assert 0 < logs["hera_loss"] < 1e4


def test_teacher_cache_skips_the_teacher_after_the_first_epoch(assets, tmp_path: Path) -> None:
    """Two epochs of 32 images, 4 steps each. Teacher inputs seen per call:
    - cache, no precomputation: 32 images in the steps of epoch 1, none in epoch 2;
    - cache with precomputation (the default on a full run): all 32 in one call before the first step, none after;
    - no cache: 64 images, 8 in every step.
    The logged losses are the same in all three runs."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera.hera.teacher import load_teacher

    teacher = load_teacher(str(assets.teacher), "cls", torch.device("cpu"))
    seen: list[int] = []
    original = teacher.forward
    teacher.forward = lambda pixels: (seen.append(pixels.shape[0]), original(pixels))[1]  # type: ignore[method-assign]

    class StepMarker(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            seen.append(-1)  # marks the start of every step

    settings = {"steps": {"hera_teacher_precompute": False}, "precomputed": {},
                "uncached": {"hera_teacher_cache": False}}
    logs = {}
    try:
        for name, overrides in settings.items():
            seen.clear()
            probe = LogProbe()
            # the alignment monitor off: its probe set's one teacher pass before step 1 is not the training's
            recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / name, max_steps=-1, num_train_epochs=2,
                                 hera_monitor_steps=0, **overrides)
            run_exp(recipe, callbacks=[probe, StepMarker()])
            logs[name] = [entry["loss"] for entry in probe.logs]
            per_step = [0]  # teacher inputs before step 1, in step 1, in step 2, ...
            for n in seen:
                per_step[-1:] = [per_step[-1], 0] if n == -1 else [per_step[-1] + n]
            assert len(per_step) == 9, seen
            if name == "steps":
                assert per_step == [0, 8, 8, 8, 8, 0, 0, 0, 0], seen
            elif name == "precomputed":
                assert per_step == [32, 0, 0, 0, 0, 0, 0, 0, 0], seen
            else:
                assert per_step == [0] + [8] * 8, seen
    finally:
        # the instance attribute goes (the process keeps this teacher): restoring it as ``original`` would pin the
        # bound method on the instance, and later tests that count the class's forward would count nothing
        del teacher.forward
    assert len(logs["steps"]) == 8
    assert logs["steps"] == logs["uncached"]
    assert logs["precomputed"] == pytest.approx(logs["steps"], rel=1e-6)


def test_precompute_true_needs_the_cache(assets, tmp_path: Path) -> None:
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_teacher_precompute=True, hera_teacher_cache=False)
    with pytest.raises(ValueError, match="hera_teacher_precompute: got true with hera_teacher_cache: false"):
        run_exp(recipe)


