"""HeRA in bf16, as the recipes run it (``bf16: true``): the head projection in float32, and a step against fp32.

bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 = 2e-3 relative (4e-3 between neighbours).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import base_recipe, saved_in_bf16
from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera_testing.projection import project_heads
from llamafactory_hera_testing.zero3 import project_in_call

HEADS, HEAD_DIM, NUM_HEADS, D = [0, 2], 16, 4, 64


def _lora_o_proj(ratio: float, dtype: torch.dtype) -> torch.nn.Module:
    """A LoRA ``o_proj`` whose delta ``s * B @ A`` is ``ratio`` of ``W`` (Frobenius norms), weights in ``dtype``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.o_proj = torch.nn.Linear(NUM_HEADS * HEAD_DIM, D, bias=False)
    model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_dropout=0.0,
                                              init_lora_weights=False))
    o_proj = model.base_model.model.o_proj
    with torch.no_grad():
        delta = o_proj.scaling["default"] * o_proj.lora_B["default"].weight @ o_proj.lora_A["default"].weight
        o_proj.lora_B["default"].weight.mul_(ratio * o_proj.base_layer.weight.norm() / delta.norm())
    return model.to(dtype).base_model.model.o_proj


def _reference(o_proj: torch.nn.Module, x: torch.Tensor, with_delta: bool = True) -> torch.Tensor:
    """``[n, B, d]`` float64: each head's ``x_h @ (W + s B A)[:, h]^T``, head by head from the stored weights."""
    weight = o_proj.base_layer.weight.double()
    if with_delta:
        weight = weight + o_proj.scaling["default"] * (
            o_proj.lora_B["default"].weight.double() @ o_proj.lora_A["default"].weight.double())
    rows = []
    for j, head in enumerate(HEADS):
        columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        rows.append(x[:, j * HEAD_DIM:(j + 1) * HEAD_DIM].double() @ weight[:, columns].T)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["weight", "by_call"])
def test_bf16_lora_delta_survives_the_projection(path: str) -> None:
    """bf16 weights, |delta|/|W| = 7e-5 (a LoRA early in training): the projected delta's effect is kept to 1 %.

    Summed in bf16 (before), the rounding of W + delta was 98.6 % of the delta's effect on the projected value
    (weight path); the ZeRO-3 path rounded its bf16 output to 2e-3 relative, 30 times the delta's effect.
    """
    o_proj = _lora_o_proj(7e-5, torch.bfloat16)
    x = torch.randn(6, len(HEADS) * HEAD_DIM).bfloat16()
    project = project_heads if path == "weight" else (
        lambda *a: project_in_call(*a)[0])
    out = project(o_proj, x, HEADS, HEAD_DIM)
    assert out.dtype == torch.float32
    exact = _reference(o_proj, x)
    effect = (exact - _reference(o_proj, x, with_delta=False)).norm()
    error = (out.double() - exact).norm()
    assert error / effect < 0.01, float(error / effect)


def test_zero3_path_equals_the_ddp_path_in_bf16() -> None:
    """The ZeRO-3 projection (through the modules' calls) equals the effective-weight one (DDP) to float32
    rounding, with bf16 weights and inputs, and so does the gradient they send to the LoRA weights."""
    o_proj = _lora_o_proj(1e-2, torch.bfloat16)
    x = torch.randn(6, len(HEADS) * HEAD_DIM).bfloat16()
    by_weight = project_heads(o_proj, x, HEADS, HEAD_DIM)
    by_call = project_in_call(o_proj, x, HEADS, HEAD_DIM)[0]
    assert by_call.dtype == by_weight.dtype == torch.float32
    torch.testing.assert_close(by_call, by_weight, rtol=1e-6, atol=1e-6)
    grads = []
    for out in (by_weight, by_call):
        weights = [o_proj.lora_A["default"].weight, o_proj.lora_B["default"].weight]
        grads.append(torch.autograd.grad(out.square().sum(), weights))
    for mine, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-2, atol=1e-6)  # bf16 gradients: 8 bits


def _first_step(assets, out: Path, bf16: bool) -> dict[str, float]:
    """The first step's log; in bf16 from a copy of the tiny model saved in bf16 (as Hub checkpoints are), whose
    weights LLaMA-Factory loads in bf16 (``torch_dtype: auto``), not the fp32 ones with autocast alone."""
    from llamafactory.train.tuner import run_exp

    model = saved_in_bf16(assets.models["qwen2_5_vl"], out.parent / f"{out.name}_model") if bf16 else (
        assets.models["qwen2_5_vl"])
    dtypes: list[torch.dtype] = []

    class WeightDtype(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            dtypes.append(head_projections(model)[1].base_layer.weight.dtype)

    run_exp(base_recipe(assets, "qwen2_5_vl", out, max_steps=1, max_samples=8, bf16=bf16, use_cpu=True,
                        model_name_or_path=str(model)), callbacks=[WeightDtype()])
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return next(entry for entry in history if "hera_loss" in entry)


def test_one_hera_step_in_bf16_matches_fp32(assets, tmp_path: Path) -> None:
    """The first step's losses in bf16 (bf16 weights, CPU autocast) against fp32, same seed and batch.

    Tolerances, relative: lm_loss 4e-3, one bf16 rounding (8 significant bits: 2^-8 between neighbours); the
    loss cannot be closer than the logits it is computed from. hera_loss 1e-2: its logits are cosine similarities
    divided by tau = 0.07, so a representation off by one rounding (4e-3) moves a logit by up to 4e-3 / 0.07 =
    0.06 and the log-softmax of the k neighbours by about as much; averaged over 8 anchors, 3 neighbours and 2
    heads, 1e-2 of a loss of ~1.7. Measured on the tiny Qwen2.5-VL with bf16 weights: 3.0e-5 and 2.6e-4 (its random
    weights give near-uniform next-token logits, on which the cross-entropy barely moves).
    """
    fp32 = _first_step(assets, tmp_path / "fp32", bf16=False)
    bf16 = _first_step(assets, tmp_path / "bf16", bf16=True)
    print(f"\nfp32 {fp32}\nbf16 {bf16}")
    for key, tolerance in (("lm_loss", 4e-3), ("hera_loss", 1e-2)):
        assert math.isfinite(bf16[key])
        assert abs(bf16[key] - fp32[key]) <= tolerance * abs(fp32[key]), (key, fp32[key], bf16[key])
