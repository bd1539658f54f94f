"""Head selection on a model larger than its device (issue 69 item 3): the memory plan against hand-worked numbers,
the refusal before any weight loads (a fake 70B config.json, no weights), and the offloaded selection's scores against
the whole-model selection's, computed in a separate process (``python -c``, the CPU, the model whole)."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from conftest import base_recipe
from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.hera.selection import collect, memory
from llamafactory_hera.hera.selection.select import (
    SelectionOptions,
    check_model_structure,
    choose_heads,
    prepare,
    score_head_neighbours,
)

OPTIONS = {"num_samples": 24, "k": 5, "device": "cpu", "progress": False, "batch_size": 7, "clamp": 0.0}


def test_plan_against_hand_worked_numbers() -> None:
    """A 70B model in bf16 (141 GB), its 80 o_proj of 8192 x 8192 in float32 (80 * 8192**2 * 4 = 21,474,836,480
    bytes) kept on the CPU, an 80 GB card."""
    reserve = 80 * 8192 * 8192 * 4
    # 0.9 * 80e9 = 72e9 < 141e9: split; CPU 0.9 * 200e9 - reserve = 180e9 - 21,474,836,480
    assert memory.plan_memory(141 * 10**9, reserve, {0: 80 * 10**9, "cpu": 200 * 10**9}) == {
        0: 72 * 10**9, "cpu": 158_525_163_520}
    # 64 GB of RAM: 72e9 + 57.6e9 - 21,474,836,480 = 108,125,163,520 < 141e9: budgets returned, the caller refuses
    assert memory.plan_memory(141 * 10**9, reserve, {0: 80 * 10**9, "cpu": 64 * 10**9}) == {
        0: 72 * 10**9, "cpu": 36_125_163_520}
    # an 8B model (16 GB) fits 72e9 whole: no plan
    assert memory.plan_memory(16 * 10**9, 32 * 4096 * 4096 * 4, {0: 80 * 10**9, "cpu": 10**9}) is None
    # on the CPU the reserve comes off its one budget: 0.9 * 20e9 - 2e9 = 16e9 holds 16e9, not 16e9 + 1
    assert memory.plan_memory(16 * 10**9, 2 * 10**9, {"cpu": 20 * 10**9}) is None
    assert memory.plan_memory(16 * 10**9 + 1, 2 * 10**9, {"cpu": 20 * 10**9}) == {"cpu": 16 * 10**9}


def test_too_large_a_model_is_refused_before_any_weight_loads(assets, tmp_path: Path, monkeypatch) -> None:
    """A Qwen2.5-VL config.json at 70B sizes and no weights: one line naming the bytes the model needs."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    config = json.loads((assets.models["qwen2_5_vl"] / "config.json").read_text())
    config["text_config"].update(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                                 layer_types=["full_attention"] * 80,
                                 rope_parameters={"mrope_section": [16, 24, 24], "rope_type": "default"})
    config["vision_config"]["out_hidden_size"] = 8192
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (big / name).write_bytes((assets.models["qwen2_5_vl"] / name).read_bytes())
    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused", model_name_or_path=str(big)))
    options = SelectionOptions(**OPTIONS, teacher=str(assets.teacher), dtype="bfloat16")
    pairs, _ = prepare(recipe_args, options)
    monkeypatch.setattr(memory, "free_memory", lambda device: {"cpu": 64 * 10**9})
    with pytest.raises(ValueError) as caught:
        score_head_neighbours(recipe_args, options, pairs)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"model_name_or_path: {big}: head selection needs 14")
    assert "GB for the model in bfloat16" in line and "cpu has 64.0 GB" in line and "quantization_bit: 4" in line
    # saved in 4 bits (a quarter of the bytes the config's dtype gives): loaded whole, as LLaMA-Factory loads it
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (big / "config.json").write_text(json.dumps(config))
    assert memory.scoring_device_map(check_model_structure(str(big), False), str(big), "cpu", "bfloat16") is None


REFERENCE = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import base_recipe
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours
from llamafactory_hera_patches.tools.model_data import parse_recipe
from llamafactory_hera.fixtures import build_tiny_assets
assets = build_tiny_assets({root!r}, seed=0)
args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
options = SelectionOptions(**{options!r}, teacher=str(assets.teacher), mode={mode!r}, dtype={dtype!r})
pairs, _ = prepare(args, options)
print(json.dumps(score_head_neighbours(args, options, pairs).scores.tolist()))
"""


@pytest.mark.parametrize(("mode", "dtype"), [("text", "bfloat16"), ("multimodal", "float32")])
def test_offloaded_selection_equals_the_whole_model(assets, monkeypatch, capfd, mode: str, dtype: str) -> None:
    """Budgets that hold part of the model in RAM put the other layers on disk (accelerate's AlignDevicesHook loads
    each one for its forward): the o_proj hooks and weights read the same values, so the scores and the chosen heads
    equal the whole-model selection's in a separate process, and the dispatched copy is freed. In bfloat16 the float32
    checkpoint is cast after the dispatch, each offloaded weight as accelerate loads it."""
    from accelerate.utils import compute_module_sizes, has_offloaded_params

    from llamafactory_hera_patches.tools.model_data import parse_recipe

    tests = Path(__file__).resolve().parents[1]
    script = REFERENCE.format(tests=str(tests), root=str(tests.parent / ".hera_assets" / "tests"), options=OPTIONS,
                              mode=mode, dtype=dtype)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    want = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))

    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    options = SelectionOptions(**OPTIONS, teacher=str(assets.teacher), mode=mode, dtype=dtype)
    pairs, _ = prepare(recipe_args, options)
    meta = check_model_structure(recipe_args.model_args.model_name_or_path, False)
    size = compute_module_sizes(meta, dtype=getattr(torch, dtype))[""]
    # RAM for 0.9 * 1.05 of the model less the o_proj reserve: the first blocks (the vision tower, ...) in RAM, at
    # least one decoder layer on disk (checked below)
    monkeypatch.setattr(memory, "free_memory", lambda device: {"cpu": size * 21 // 20, "disk": 10 * size})
    offloaded, copies = [], []
    read = collect.layer_weights

    def spy(model: torch.nn.Module) -> dict[int, torch.Tensor]:
        offloaded.extend(layer for layer, o_proj in head_projections(model).items() if has_offloaded_params(o_proj)
                         and o_proj.weight.device.type == "meta")
        copies.append(weakref.ref(model))
        return read(model)

    monkeypatch.setattr(collect, "layer_weights", spy)
    got = score_head_neighbours(recipe_args, options, pairs).scores
    assert offloaded, "no o_proj was offloaded: the budgets did not split the model"
    assert copies[0]() is None, "the dispatched scoring copy outlived the selection"
    assert " GB on disk (offloaded: " in capfd.readouterr().out
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert choose_heads(got, 3, "worst", 0) == choose_heads(want, 3, "worst", 0)


def test_the_plan_holds_under_fsdp_efficient_loading(assets, tmp_path: Path, monkeypatch) -> None:
    """``accelerate launch`` with the shipped FSDP2 config (efficient loading) made LLaMA-Factory drop the
    device_map of the one rank that selects (transformers' is_fsdp_enabled): a model on the CPU scored on the GPU,
    and no dispatch. One process with a one-rank gloo group and accelerate's environment."""
    from accelerate.utils import has_offloaded_params

    from llamafactory_hera_patches.tools.model_data import load_model_for_scoring, parse_recipe

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
        model, _, _ = load_model_for_scoring(recipe_args, "cpu", {"model": "cpu", "lm_head": "disk"})
    finally:
        torch.distributed.destroy_process_group()
    assert has_offloaded_params(model.lm_head) and model.lm_head.weight.device.type == "meta"
