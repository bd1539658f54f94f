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

from conftest import base_recipe, read_trainer_log, saved_in_bf16
from llamafactory_hera.heads.architecture import head_projections

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("repacking_cpu")  # every eval forward keeps the 4-bit layout on any CPU
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
        quant_state = getattr(o_proj.base_layer.weight, "quant_state", None)
        self.seen["weight_dtype"] = quant_state.dtype if quant_state is not None else o_proj.base_layer.weight.dtype
        self.seen["compute_dtype"] = getattr(o_proj.base_layer, "compute_dtype", None)
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
    ({"use_dora": True}, "Linear", None),
], ids=["nf4", "fp4_double", "int8", "dora"])
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


def test_qlora_in_bf16_from_a_bf16_checkpoint(assets, tmp_path: Path) -> None:
    """As users run the QLoRA recipe: a checkpoint saved in bf16 (as on the Hub; ``torch_dtype: auto`` keeps it),
    ``bf16: true``, nf4 with double quantization: o_proj's 4-bit weight dequantizes to bf16, the layer computes in
    bf16, and the HeRA term reaches the heads' adapter (against its ``hera_lambda: 0`` twin)."""
    folder = saved_in_bf16(assets.models[FAMILY], tmp_path / "model")
    with_hera, without = _twins(assets, tmp_path, model_name_or_path=str(folder), quantization_bit=4,
                                double_quantization=True, bf16=True, use_cpu=True)
    assert with_hera["base"] == "Linear4bit" and with_hera["quant_type"] == "nf4"
    assert with_hera["weight_dtype"] == with_hera["compute_dtype"] == torch.bfloat16
    name = next(n for n in with_hera["grads"] if "lora_B" in n)
    assert (with_hera["grads"][name] - without["grads"][name]).abs().max() > 1e-7


def _saved_quantized(assets, folder: Path, quantization_config: dict[str, Any] | None, bits: int = 4) -> Path:
    """The tiny model's folder with its weights saved ``bits``-bit by bitsandbytes (``quantization_config`` None), or
    with another method's ``quantization_config`` written into config.json (weights untouched: refused unread)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    shutil.copytree(assets.models[FAMILY], folder)
    if quantization_config is None:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32, device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
        model.save_pretrained(folder)
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


@pytest.mark.parametrize(("bits", "base", "quant_type"), [(4, "Linear4bit", "fp4"), (8, "Linear8bitLt", None)])
def test_a_checkpoint_saved_quantized_trains_hera_on_its_quantized_weights(assets, tmp_path: Path, bits: int,
                                                                           base: str, quant_type: str | None) -> None:
    """No quantization_bit: LLaMA-Factory loads the checkpoint's own quantization_config; the HeRA term reaches the
    heads' adapter through the quantized o_proj (4-bit: fp4, BitsAndBytesConfig's default)."""
    folder = _saved_quantized(assets, tmp_path / "model", None, bits)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    with_hera, without = _twins(assets, tmp_path, model_name_or_path=str(folder))
    assert with_hera["base"] == base and with_hera["quant_type"] == quant_type
    name = next(n for n in with_hera["grads"] if "lora_B" in n)
    assert (with_hera["grads"][name] - without["grads"][name]).abs().max() > 1e-7


@pytest.mark.parametrize("method", ["gptq", "awq", "aqlm", "eetq", "hqq", "fp8", "mxfp4"])
def test_a_checkpoint_saved_in_an_unreadable_quantization_is_refused_before_loading(assets, tmp_path: Path,
                                                                                    method: str) -> None:
    from llamafactory.train.tuner import run_exp

    folder = _saved_quantized(assets, tmp_path / "model", {"quant_method": method, "bits": 4})
    recipe = base_recipe(assets, FAMILY, tmp_path / "out", model_name_or_path=str(folder), hera_heads=["L1H0"])
    with pytest.raises(ValueError, match=f"stage: hera reads W_O per head, and model_name_or_path: {folder} \\(saved "
                                         f"{method}-quantized: quantization_config in its config.json\\) cannot be "
                                         "read exactly"):
        run_exp(recipe)
    assert not (tmp_path / "out").exists()


def test_the_trainers_evaluation_steps_leave_the_4bit_model_training(assets, tmp_path: Path) -> None:
    """The Trainer's own evaluation (``val_size``, every step; the monitor off, whose forwards keep the layout too):
    eval forwards of the 4-bit model being trained, after which its next steps still train (hera/workflow.py keeps
    bitsandbytes' layout from the trainer's start)."""
    from llamafactory.train.tuner import run_exp

    out = tmp_path / "out"
    run_exp(base_recipe(assets, FAMILY, out, quantization_bit=4, hera_heads=["L1H0", "L1H2"], hera_k=3, max_steps=2,
                        hera_monitor_steps=0, val_size=0.25, eval_strategy="steps", eval_steps=1,
                        per_device_eval_batch_size=4))
    log = read_trainer_log(out)
    assert [line["current_steps"] for line in log if "eval_loss" in line] == [1, 2]
    assert [line["current_steps"] for line in log if "loss" in line] == [1, 2]


def test_select_and_the_monitor_run_on_the_4bit_model(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``llamafactory-hera select`` and ``hera_heads: auto`` score the same 4-bit model (same scores, same heads), and
    the alignment monitor logs its MKNN during the quantized run, beside the Trainer's evaluation steps (``val_size``):
    eval forwards of the model being trained, after which it still trains."""
    import yaml
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera.cli import main

    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(tmp_path / "cache"))
    recipe = base_recipe(assets, FAMILY, tmp_path / "out", hera_heads="auto", quantization_bit=4, max_steps=2,
                         hera_select_samples=12, hera_k=3, hera_select_num_heads=2, hera_select_batch_size=4,
                         hera_monitor_steps=1, val_size=0.25, eval_strategy="steps", eval_steps=1,
                         per_device_eval_batch_size=4)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    assert main(["select", str(path), "--device", "cpu", "--dry-run"]) == 0
    selected = json.loads((tmp_path / "recipe.hera_selection.json").read_text())
    probe = AdapterProbe()
    run_exp(recipe, callbacks=[probe])
    assert probe.seen["base"] == "Linear4bit"
    auto = json.loads((tmp_path / "out" / "hera_selection.json").read_text())
    assert auto["scores"] == selected["scores"] and auto["selected"] == selected["selected"]
    log = read_trainer_log(tmp_path / "out")
    points = [line for line in log if "hera_mknn" in line]
    assert points and all(torch.isfinite(torch.tensor(p["hera_mknn"])) for p in points)
    assert [line["current_steps"] for line in log if "eval_loss" in line] == [1, 2]
    assert [line["current_steps"] for line in log if "loss" in line] == [1, 2]
