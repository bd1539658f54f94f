"""RAH-LoRA with ``use_dora: true`` (a DoRA adapter of the same calibration, never a silent plain LoRA), on a model
its device does not hold (layers offloaded to RAM or disk: the one-device adapter) and on quantized models:
bitsandbytes 4-/8-bit calibrates as its dequantized twin; other quantizations are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_rah_stage import _logits, rah_recipe

from conftest import run_train


@pytest.fixture(scope="module")
def dora_run(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one ``use_dora: true`` run of tiny LLaVA, whole on the CPU (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("dora")
    run_train(rah_recipe(assets, "llava", tmp / "out", use_dora=True), tmp)
    return tmp / "out"


def test_use_dora_writes_a_dora_adapter_equal_to_the_calibration(assets, dora_run: Path) -> None:
    """adapter_config says use_dora: true, the file holds each module's magnitude, and the model LLaMA-Factory loads
    with it equals the base model plus the adapter's B @ A added by hand (the calibrated W + alpha Delta)."""
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    out = dora_run
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    pairs = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    assert pairs and len(magnitudes) == len(pairs), sorted(tensors)

    base_args = parse_recipe({**rah_recipe(assets, "llava", out), "stage": "sft"})
    by_hand, tokenizer_module, template = load_model_for_scoring(base_args, "cpu")
    by_hand = by_hand.float()
    with torch.no_grad():
        for prefix in pairs:
            name = prefix.removeprefix("base_model.model.")
            delta = tensors[f"{prefix}.lora_B.weight"].float() @ tensors[f"{prefix}.lora_A.weight"].float()
            assert delta.abs().max() > 0
            by_hand.get_submodule(name).weight += delta
    dataset, collator = multimodal_dataset_and_collator(base_args, by_hand, tokenizer_module, template, 0, [0])
    batch = collator([dataset[0]])
    adapted_args = parse_recipe({**rah_recipe(assets, "llava", out), "stage": "sft", "adapter_name_or_path": str(out),
                                 "use_dora": True})
    adapted, _, _ = load_model_for_scoring(adapted_args, "cpu")
    torch.testing.assert_close(_logits(adapted.float(), batch), _logits(by_hand, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("offload", ["disk", "ram"])
def test_a_model_its_device_does_not_hold_writes_the_one_device_adapter(assets, dora_run: Path, tmp_path: Path,
                                                                         monkeypatch, offload: str) -> None:
    """The stage through ``run_exp`` with the language model's weights off the device, on ``meta`` between forwards:
    "disk", placed by RAH-LoRA's own plan from a free memory that holds 3/5 of the model (the language model goes to
    disk, each weight read from the checkpoint for its forward), a DoRA adapter; "ram", every decoder layer under
    accelerate's CPU offload as loaded (weights in the hook's RAM map), a LoRA adapter. The adapter written equals the
    whole model's (:func:`dora_run`: the same calibration) within 1e-6, DoRA's magnitude (the calibrated weight's
    row norms) included, and loads with PEFT."""
    from accelerate import cpu_offload
    from accelerate.utils import compute_module_sizes, has_offloaded_params
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from llamafactory_hera import placement
    from llamafactory_hera.heads.architecture import text_decoder
    from llamafactory_hera.rah import workflow

    meta = placement.check_model_structure(str(assets.models["llava"]), False)
    size = compute_module_sizes(meta, dtype=torch.float32)[""]
    if offload == "disk":
        monkeypatch.setattr(placement, "free_memory", lambda device: {"cpu": size * 3 // 5, "disk": 10 * size})
    load, offloaded = workflow.load_model_for_scoring, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        layers = text_decoder(loaded[0]).layers
        if offload == "ram":
            for layer in layers:
                cpu_offload(layer, execution_device=torch.device("cpu"))
        attention = layers[0].self_attn
        offloaded.extend(has_offloaded_params(p) and p.weight.device.type == "meta"
                         for p in (attention.v_proj, attention.o_proj))
        return loaded

    monkeypatch.setattr(workflow, "load_model_for_scoring", spy)
    out = tmp_path / "out"
    proc = run_train(rah_recipe(assets, "llava", out, use_dora=offload == "disk"), tmp_path)
    assert offloaded == [True, True], offloaded
    assert offload != "disk" or " GB on disk (offloaded: " in proc.stdout + proc.stderr
    written, whole = (load_file(str(run / "adapter_model.safetensors")) for run in (out, dora_run))
    if offload == "ram":  # a LoRA adapter: the DoRA run's without its magnitudes
        whole = {key: value for key, value in whole.items() if "lora_magnitude_vector" not in key}
    assert sorted(written) == sorted(whole) and any("lora_magnitude_vector" in key for key in written) == (
        offload == "disk")
    difference = max(float((written[key] - whole[key]).abs().max()) for key in whole)
    print(f"{offload}-offloaded adapter against the whole model's: max |difference| {difference:.3g}")
    assert difference <= 1e-6
    base = AutoModelForImageTextToText.from_pretrained(assets.models["llava"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out))
    loaded = adapted.state_dict()
    assert all(torch.equal(loaded[key.replace(".weight", ".default.weight") if "lora_magnitude" not in key else
                                  key.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")], value)
               for key, value in written.items())


def _dequantized_twin(assets, folder: Path, bits: int) -> Path:
    """Tiny LLaVA quantized as LLaMA-Factory's quantization_bit does it on a CPU (4: nf4, double quantization, float32
    compute and storage; 8: LLM.int8 codes and row scales) and saved with, as plain float32 weights, what each
    quantized layer multiplies by: 4-bit, bitsandbytes' dequantize_4bit (transformers' dequantize()); 8-bit, codes *
    (SCB / 127), the order of bitsandbytes' CPU product (its dequantize function rounds (codes * SCB) / 127, up to one
    float32 ulp away: measured 7e-9 an entry, which the SVD carries to 7.5e-7 in lora_A)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    shutil.copytree(assets.models["llava"], folder)
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                        quantization_config=quantization)
    int8 = {name: module.weight.data.float() * (module.weight.SCB.float()[:, None] * (1.0 / 127.0))
            for name, module in model.named_modules() if getattr(module.weight if hasattr(module, "weight") else None,
                                                                 "SCB", None) is not None}
    model = model.dequantize()
    with torch.no_grad():
        for name, weight in int8.items():
            model.get_submodule(name).weight.copy_(weight)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# The adapter of a bitsandbytes base against its dequantized twin's. A and B are functions of the V and O weights,
# read as the quantized layers multiply by them (the twin's stored values bit for bit), and of the discrete choices
# (targets, anchors, the alpha of the ladder alpha_max / 2^k), which the forwards decide. The forwards differ only
# where a step is tried: beside a quantized weight the adapter's product is added ((x A^T) B^T, as LLaMA-Factory
# applies an adapter to a quantized base), where the twin merges it (x round(W + BA)^T): one product's rounding in the
# model's dtype (float32 here: 2^-24 relative). At 8-bit, eval mode also runs LLM.int8 (inputs rounded to float16,
# then to int8 per row: up to max|x| / 254 an entry, 6.6e-3 relative on a layer). So unless a decision lies within that
# rounding of its threshold (a percentile, an anchor's rank, KL = delta), every decision agrees and A, B and B @ A equal
# the twin's bit for bit: the bound is 0 (a flipped alpha would show as B off by a factor of 2 in that target).
@pytest.mark.usefixtures("repacking_cpu")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_calibrates_as_its_dequantized_twin(assets, tmp_path: Path, bits: int) -> None:
    from llamafactory.train.tuner import run_exp

    twin = _dequantized_twin(assets, tmp_path / "twin", bits)
    small = {"rah_samples": 6, "rah_probe_samples": 3, "rah_kl_samples": 2, "rah_delta": 0.05}
    run_exp(rah_recipe(assets, "llava", tmp_path / "q", quantization_bit=bits, **small))
    run_exp(rah_recipe(assets, "llava", tmp_path / "t", model_name_or_path=str(twin), **small))
    quantized, dequantized = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("q", "t"))
    assert sorted(quantized) == sorted(dequantized)
    records = [json.loads((tmp_path / run / "rah_profile.json").read_text())["targets"] for run in ("q", "t")]
    assert [[(t["head"], t["alpha"], t["outcome"]) for t in run] for run in records] == \
        [[(t["head"], t["alpha"], t["outcome"]) for t in records[1]]] * 2  # the same decisions
    prefixes = sorted({key.rsplit(".lora_", 1)[0] for key in quantized})
    differences = {kind: max(float((quantized[f"{p}.lora_{kind}.weight"] - dequantized[f"{p}.lora_{kind}.weight"])
                                   .abs().max()) for p in prefixes) for kind in ("A", "B")}
    differences["BA"] = max(float((quantized[f"{p}.lora_B.weight"] @ quantized[f"{p}.lora_A.weight"]
                                   - dequantized[f"{p}.lora_B.weight"] @ dequantized[f"{p}.lora_A.weight"]).abs().max())
                            for p in prefixes)
    print(f"{bits}-bit vs its dequantized twin, max |difference|:", differences, "targets:", records[0])
    assert differences == {"A": 0.0, "B": 0.0, "BA": 0.0}


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("keys,method", [({"quantization_method": "hqq", "quantization_bit": 4}, "hqq"),
                                         ({"quantization_method": "eetq", "quantization_bit": 8}, "eetq"),
                                         ("gptq", "gptq"), ("awq", "awq")])
def test_quantizations_other_than_bitsandbytes_are_refused_by_name(assets, tmp_path: Path, keys, method) -> None:
    """A recipe's quantization_method or a checkpoint saved quantized (its config.json's quantization_config): one
    line naming the method, before loading."""
    from test_launch_refusals import _refused

    if isinstance(keys, str):
        folder = tmp_path / keys
        shutil.copytree(assets.models["llava"], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": keys,
                                                                                          "bits": 4}}))
        keys = {"model_name_or_path": str(folder)}
    message = _refused(rah_recipe(assets, "llava", tmp_path / "out", **keys))
    assert message.startswith("stage: rah reads V and O weights per head, and ") and \
        f"{method} stores packed codes in its kernels' own layout" in message, message
