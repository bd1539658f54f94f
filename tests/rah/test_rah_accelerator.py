"""RAH-LoRA on the simulated accelerator: ``stage: rah`` through LLaMA-Factory's ``run_exp``
with the model on the device, and the calibration's parts (I-SAL, CAF gate gradients, the trust region) giving the
CPU's values there. Host syncs of a calibration are counted by kind."""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from llamafactory_hera.demo.rah import build_rah_recipe

pytestmark = pytest.mark.accelerator

# fewer rows than the demo (32 / 16 / 8): every op runs through the dispatch mode
SMALL = {"rah_samples": 6, "rah_probe_samples": 3, "rah_kl_samples": 2}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_stage_rah_calibrates_on_the_accelerator_and_writes_the_adapter(assets, accelerator, tmp_path: Path,
                                                                        family: str) -> None:
    """The whole stage with the model on the device: at least one head calibrated, the adapter written; it loads
    with PEFT on the CPU and is not zero. The host syncs of the run are counted by kind."""
    from llamafactory.train.tuner import run_exp
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    recipe = {**build_rah_recipe(assets, family, out), **SMALL}
    with accelerator:
        run_exp(recipe)
    print(f"{family}: host syncs of the whole stage by kind: {dict(accelerator.counts)}")
    profile = json.loads((out / "rah_profile.json").read_text())
    assert profile["summary"]["calibrated"] >= 1, profile["summary"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(t.device.type == "cpu" for t in tensors.values())
    assert any(bool(t.abs().sum() > 0) for name, t in tensors.items() if "lora_B" in name)
    base = AutoModelForImageTextToText.from_pretrained(recipe["model_name_or_path"], torch_dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out))
    loaded = {name: p for name, p in adapted.named_parameters() if "lora_" in name}
    assert loaded and all(p.device.type == "cpu" for p in loaded.values())
    assert any(bool(p.abs().sum() > 0) for name, p in loaded.items() if "lora_B" in name)


def _on_device(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.nn.Module, list[dict]]:
    """A copy of ``model`` and the batches on the simulated device (call inside the mode)."""
    from llamafactory_hera_testing.accelerator import DEVICE

    moved = [{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    return copy.deepcopy(model).to(DEVICE), moved


def test_isal_maps_and_gate_gradients_on_the_accelerator_equal_the_cpu(assets, accelerator, tmp_path: Path) -> None:
    """I-SAL, the text->image maps and the CAF gate gradients of the device model are the CPU model's, bit for bit
    (the device computes with the CPU's kernels), and come back on the host (the selection runs there)."""
    from test_rah_model import _load

    from llamafactory_hera.rah.plan import plan_calibration
    from llamafactory_hera.rah.probe import AttentionProfile, gate_gradients, profile_attention

    model, kinds, batches = _load(assets, "qwen2_5_vl", tmp_path, samples=3)
    geometry = plan_calibration(model).geometry
    cpu = AttentionProfile([0, 1])
    for batch in batches:
        profile_attention(model, batch, [0, 1], kinds, cpu)
    cpu_grads = [gate_gradients(model, b, [0, 1], geometry.num_heads, geometry.head_dim, kinds) for b in batches]
    with accelerator:
        on_device, device_batches = _on_device(model, batches)
        profile = AttentionProfile([0, 1])
        for batch in device_batches:
            profile_attention(on_device, batch, [0, 1], kinds, profile)
        grads = [gate_gradients(on_device, b, [0, 1], geometry.num_heads, geometry.head_dim, kinds)
                 for b in device_batches]
    assert profile.scores().device.type == "cpu" and torch.equal(profile.scores(), cpu.scores())
    assert torch.equal(profile.maps().cpu(), cpu.maps())
    assert all(g.device.type == "cpu" and torch.equal(g, c) for g, c in zip(grads, cpu_grads, strict=True))


def test_calibrate_with_the_trust_region_on_the_accelerator_equals_the_cpu(assets, accelerator,
                                                                           tmp_path: Path) -> None:
    """``calibrate()`` on the device with a delta tight enough that heads halve or roll back: the same targets,
    anchors, alphas tried with their KL and the same weights as on the CPU. Its host syncs are counted by kind;
    none is per probe batch per alpha tried (one per alpha: the KL the search compares with delta)."""
    from test_rah_model import FORCED, _load

    from llamafactory_hera.rah.calibrate import calibrate
    from llamafactory_hera.rah.config import RahArguments

    model, kinds, batches = _load(assets, "llava", tmp_path, samples=7)
    on_cpu = copy.deepcopy(model)
    settings = RahArguments(rah_layers=[0, 1], rah_delta=1e-6, rah_halvings=3, **FORCED)
    cpu = calibrate(on_cpu, batches[:4], batches[:2], batches[4:7], settings, kinds)
    regions = [u.region for u in cpu.updates if u.region is not None]
    assert any(r.alpha < settings.rah_alpha_max for r in regions), [r.tried for r in regions]  # halved or rolled back
    with accelerator:
        on_device, device_batches = _on_device(model, batches)
        accelerator.reset()
        calibration = calibrate(on_device, device_batches[:4], device_batches[:2], device_batches[4:7], settings,
                                kinds)
        syncs = dict(accelerator.counts)
        where = Counter(accelerator.report().splitlines())
        weights = {name: p.detach().cpu() for name, p in on_device.named_parameters()}
    tries = sum(len(u.region.tried) for u in calibration.updates if u.region is not None)
    print(f"calibrate(): {len(calibration.updates)} targets, {tries} alphas tried on 3 KL batches; host syncs by "
          f"kind: {syncs}")
    assert [(u.layer, u.head, [a[:2] for a in u.anchors], u.region) for u in calibration.updates] == \
        [(u.layer, u.head, [a[:2] for a in u.anchors], u.region) for u in cpu.updates]
    assert all(torch.equal(weights[name], p) for name, p in on_cpu.named_parameters())
    # the selection and the trust region (calibrate.py, targets_anchors.py, update.py): one sync per alpha tried (the KL
    # compared with delta), one per KL probe sample (its positions, found once), one per target (its anchors'
    # similarities), one per accepted head
    selection = sum(n for line, n in where.items() if "to device" not in line and any(
        f"llamafactory_hera/rah/{name}.py" in line for name in ("calibrate", "targets_anchors", "update")))
    targets = len(calibration.updates)
    accepted = sum(1 for u in calibration.updates if u.region is not None and u.region.alpha > 0)
    print("\n".join(f"{n} {line}" for line, n in where.most_common()))
    # +1: the KL of the whole calibration; one per accepted head: did its step move any weight in the model's dtype
    assert selection == (tries + 1) + 3 + targets + accepted, where


@pytest.mark.parametrize("where", ["on the accelerator", "offloaded"])
def test_a_layer_on_another_device_calibrates_as_one_device(assets, accelerator, tmp_path: Path, where: str) -> None:
    """Layer 1 placed as accelerate places a model over several devices (its hook moves the inputs there and the output
    back): on the simulated accelerator, or offloaded (its weights in RAM, brought in for each forward, meta between).
    The calibration of both layers gives the one-device model's targets, anchors, alphas and adapter: on the device
    bit for bit; offloaded, the steps are tried beside the weights (the product added, not merged), so the KL and the
    factors of a later target of that layer agree to float32 rounding."""
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from test_rah_model import FORCED, _load

    from llamafactory_hera.heads.architecture import text_decoder
    from llamafactory_hera.rah.adapter import lora_factors
    from llamafactory_hera.rah.calibrate import calibrate
    from llamafactory_hera.rah.config import RahArguments
    from llamafactory_hera_testing.accelerator import DEVICE

    model, kinds, batches = _load(assets, "llava", tmp_path, samples=6)
    split = copy.deepcopy(model)
    settings = RahArguments(rah_layers=[0, 1], rah_delta=10.0, **FORCED)
    whole = calibrate(model, batches[:4], batches[:2], batches[4:6], settings, kinds)
    with accelerator if where == "on the accelerator" else contextlib.nullcontext():  # meta is both there
        layer = text_decoder(split).layers[1]
        if where == "offloaded":
            cpu_offload(layer, execution_device=torch.device("cpu"))
        else:
            add_hook_to_module(layer.to(DEVICE), AlignDevicesHook(execution_device=DEVICE, io_same_device=True))
        calibration = calibrate(split, batches[:4], batches[:2], batches[4:6], settings, kinds)
        factors = lora_factors(calibration, split, calibration.plan.geometry)
    decisions = [[(u.layer, u.head, [a[:2] for a in u.anchors], u.outcome, u.region and u.region.alpha)
                  for u in run.updates] for run in (whole, calibration)]
    assert decisions[0] == decisions[1] and any(u.layer == 1 and u.calibrated for u in whole.updates), decisions
    assert bool(calibration.overlay.kept) == (where == "offloaded")  # an offloaded layer's steps stay beside it
    expected = lora_factors(whole, model, whole.plan.geometry)
    assert sorted(factors) == sorted(expected)
    tolerance = 0.0 if where == "on the accelerator" else 1e-6
    for name, (a, b) in expected.items():
        torch.testing.assert_close(factors[name][0], a, rtol=0, atol=tolerance)
        torch.testing.assert_close(factors[name][1], b, rtol=0, atol=tolerance)
