"""Head selection on a model larger than its device (llamafactory_hera/placement.py): the memory plan against
hand-worked numbers, Qwen2.5-VL-72B's plans on eight 80 GB GPUs and on one (free memory faked), the refusal before any
weight loads (a 72B config.json, no weights), and the scores of a model split over RAM and disk against the
whole-model selection's, computed in a separate process (forked from the worker's warm process; the CPU, the model
whole)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import compute_module_sizes
from dist_runs import run_python

from conftest import base_recipe, offline_env
from llamafactory_hera import placement
from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.select import (
    SelectionOptions,
    choose_heads,
    prepare,
    score_head_neighbours,
)
from llamafactory_hera.placement import check_model_structure

OPTIONS = {"num_samples": 24, "k": 5, "device": "cpu", "progress": False, "batch_size": 7, "clamp": 0.0}


def test_plan_against_hand_worked_numbers() -> None:
    """A 70B model in bf16 (141 GB), its 80 o_proj of 8192 x 8192 in float32 (80 * 8192**2 * 4 = 21,474,836,480
    bytes) kept on the CPU, an 80 GB card."""
    reserve = 80 * 8192 * 8192 * 4
    # 0.9 * 80e9 = 72e9 < 141e9: split; CPU 0.9 * 200e9 - reserve = 180e9 - 21,474,836,480
    assert placement.plan_memory(141 * 10**9, reserve, {0: 80 * 10**9, "cpu": 200 * 10**9}) == {
        0: 72 * 10**9, "cpu": 158_525_163_520}
    # 64 GB of RAM: 72e9 + 57.6e9 - 21,474,836,480 = 108,125,163,520 < 141e9: budgets returned, the caller refuses
    assert placement.plan_memory(141 * 10**9, reserve, {0: 80 * 10**9, "cpu": 64 * 10**9}) == {
        0: 72 * 10**9, "cpu": 36_125_163_520}
    # an 8B model (16 GB) fits 72e9 whole: no plan, where the RAM keeps its o_proj weights (2,147,483,648 bytes)
    assert placement.plan_memory(16 * 10**9, 32 * 4096 * 4096 * 4, {0: 80 * 10**9, "cpu": 3 * 10**9}) is None
    # with 1 GB of RAM it does not (0.9e9 - 2,147,483,648 < 0): budgets returned, the caller refuses
    assert placement.plan_memory(16 * 10**9, 32 * 4096 * 4096 * 4, {0: 80 * 10**9, "cpu": 10**9}) == {
        0: 72 * 10**9, "cpu": -1_247_483_648}
    # on the CPU the reserve comes off its one budget: 0.9 * 20e9 - 2e9 = 16e9 holds 16e9, not 16e9 + 1
    assert placement.plan_memory(16 * 10**9, 2 * 10**9, {"cpu": 20 * 10**9}) is None
    assert placement.plan_memory(16 * 10**9 + 1, 2 * 10**9, {"cpu": 20 * 10**9}) == {"cpu": 16 * 10**9}


# Qwen2.5-VL-72B's sizes (its config.json): 80 decoder layers of 877,684,736 parameters (q 8192^2 + 8192 bias, k and v
# 8192 x 1024 + 1024 each, o 8192^2, the MLP 3 x 8192 x 29568, two norms of 8192), embeddings and output layer of
# 152064 x 8192 each, a 32-block vision tower of 1280: 73,410,777,344 parameters, 146,821,554,688 bytes in bf16
TEXT_72B = {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 152064, "layer_types": ["full_attention"] * 80,
            "rope_parameters": {"mrope_section": [16, 24, 24], "rope_type": "default"}}
VISION_72B = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16, "out_hidden_size": 8192,
              "fullatt_block_indexes": [7, 15, 23, 31]}
BYTES_72B, LAYER_72B = 146_821_554_688, 2 * 877_684_736


@pytest.fixture(scope="module")
def model_72b(assets, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A Qwen2.5-VL-72B folder (config.json at its sizes, the tiny model's tokenizer, no weights) and its meta model."""
    config = json.loads((assets.models["qwen2_5_vl"] / "config.json").read_text())
    config["text_config"].update(TEXT_72B)
    config["vision_config"].update(VISION_72B)
    big = tmp_path_factory.mktemp("qwen2_5_vl_72b")
    (big / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (big / name).write_bytes((assets.models["qwen2_5_vl"] / name).read_bytes())
    return big, check_model_structure(str(big), False)


def test_a_72b_model_over_eight_gpus_and_over_one_gpu_and_the_cpu(model_72b, monkeypatch, capsys) -> None:
    """Eight 80 GB GPUs hold Qwen2.5-VL-72B in bf16 without the CPU, each about an eighth (accelerate's balance: the
    first seven at most 146.8e9 / 8 + 1.25 decoder layers, the last the rest); one 80 GB GPU holds what fits 0.9 x 80e9
    less the largest layer (kept free to run an offloaded one), the CPU the rest, copied to the GPU in every batch."""
    big, meta = model_72b
    sizes = compute_module_sizes(meta, dtype=torch.bfloat16)
    assert sum(p.numel() for p in meta.parameters()) * 2 == BYTES_72B and 0 <= sizes[""] - BYTES_72B < 1000  # buffers
    reserve = (80 * 8192 * 8192 * 4, "its o_proj weights in float32")
    plans = {}
    for gpus in (8, 1):
        free = {index: 80 * 10**9 for index in range(gpus)} | {"cpu": 400 * 10**9}
        monkeypatch.setattr(placement, "free_memory", lambda device, free=free: free)
        device_map = placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", reserve=reserve)
        plans[gpus] = {at: sum(sizes[name] for name, where in device_map.items() if where == at)
                       for at in {*device_map.values()}}
        assert sum(plans[gpus].values()) == sizes[""]
    line8, line1 = capsys.readouterr().out.strip().splitlines()
    assert set(plans[8]) == set(range(8)) and "0.0 GB on cpu (no layer offloaded)." in line8
    assert all(BYTES_72B / 8 - 2 * LAYER_72B <= plans[8][gpu] <= BYTES_72B / 8 + 1.25 * LAYER_72B for gpu in range(7))
    assert plans[8][7] == sizes[""] - sum(plans[8][gpu] for gpu in range(7))
    assert set(plans[1]) == {0, "cpu"} and 72e9 - 2 * LAYER_72B <= plans[1][0] <= 72e9 - LAYER_72B
    assert line1.endswith(f" {plans[1][0] / 1e9:.1f} GB on cuda:0, {plans[1]['cpu'] / 1e9:.1f} GB on cpu (offloaded: "
                          "each batch copies the layers it runs from there to a GPU, one at a time).")
    # 64 GB of RAM: 72e9 + 0.9 x 64e9 - 21,474,836,480 = 108,125,163,520 bytes < 146.8e9: refused, naming each place
    monkeypatch.setattr(placement, "free_memory", lambda device: {0: 80 * 10**9, "cpu": 64 * 10**9})
    with pytest.raises(ValueError) as caught:
        placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", reserve=reserve)
    assert str(caught.value) == (
        f"model_name_or_path: {big}: head selection needs 146.8 GB for the model in bfloat16 and 21.5 GB of CPU RAM "
        "for its o_proj weights in float32, 90% of the free memory usable: cuda:0 has 80.0 GB, cpu has 64.0 GB. "
        f"{placement.FIX}, or set quantization_bit: 4 (41.6 GB).")  # 8 bits: 75.9 GB > 72 GB (below)


def test_other_gpus_are_used_only_by_a_process_alone_on_its_node(monkeypatch) -> None:
    """Free memory is read on every visible GPU, the job's first, where the process is the node's only one; under a
    launch of several processes on the node, on its own GPU alone."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: ((10 + index) * 10**9, 80 * 10**9))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    free = placement.free_memory("cuda:2")
    assert list(free) == [2, 0, 1, 3, "cpu"] and free[3] == 13 * 10**9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert list(placement.free_memory("cuda:2")) == [2, "cpu"]


def test_too_large_a_model_is_refused_before_any_weight_loads(assets, model_72b, monkeypatch) -> None:
    """Selection on a Qwen2.5-VL-72B config.json and no weights: one line naming the bytes the model needs."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    big, _ = model_72b
    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused", model_name_or_path=str(big)))
    options = SelectionOptions(**OPTIONS, teacher=str(assets.teacher), dtype="bfloat16")
    pairs, _ = prepare(recipe_args, options)
    monkeypatch.setattr(placement, "free_memory", lambda device: {"cpu": 64 * 10**9})
    with pytest.raises(ValueError) as caught:
        score_head_neighbours(recipe_args, options, pairs)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"model_name_or_path: {big}: head selection needs 146.8 GB for the ")
    # in 4 bits 41.6 GB + 21.5 GB of o_proj copies > 0.9 x 64 GB: not offered
    assert "cpu has 64.0 GB" in line and line.endswith("list its heads in hera_heads.")
    # saved in 4 bits (a quarter of the bytes the config's dtype gives): loaded whole, as LLaMA-Factory loads it
    config = json.loads((big / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (big / "config.json").write_text(json.dumps(config))
    try:
        assert placement.device_map_for(check_model_structure(str(big), False), str(big), "cpu", "bfloat16") is None
    finally:
        del config["quantization_config"]
        (big / "config.json").write_text(json.dumps(config))


# Qwen2.5-VL-72B's linear weights but the output layer (bitsandbytes quantizes these): 80 decoder layers of 877,658,112
# (q and o 8192^2, k and v 8192 x 1024, the MLP 3 x 8192 x 29568), 32 vision blocks of 19,824,640 (qkv 1280 x 3840,
# proj 1280^2, the MLP 3 x 1280 x 3456) and the merger's 5120^2 + 5120 x 8192, in 7,300,096 output rows
LINEAR_72B, ROWS_72B = 80 * 877_658_112 + 32 * 19_824_640 + 5120 * 5120 + 5120 * 8192, 7_300_096
OTHERS_72B = BYTES_72B - 2 * LINEAR_72B  # embeddings, output layer, biases, norms, patch embedding: bf16
BITS_72B = {4: LINEAR_72B // 2 + LINEAR_72B // 64 + LINEAR_72B // 64 // 256 * 4 + OTHERS_72B,  # codes, absmax, scales
            8: LINEAR_72B + 4 * ROWS_72B + OTHERS_72B}  # codes, a float32 scale per row


def test_a_quantized_model_is_sized_in_its_codes_and_only_a_quantization_that_fits_is_offered(
        assets, model_72b, monkeypatch, capsys) -> None:
    """``quantization_bit`` (Qwen2.5-VL-72B's config, no weights): the model is counted in bitsandbytes' bytes (4 bits:
    41.6 GB with double quantization; 8 bits: 75.9 GB), whole on the device, besides 21.5 GB of o_proj copies in RAM.
    select on a machine of 23 GB: one line naming the bytes, before any weight loads, offering no quantization (none
    fits); 8 bits on an 80 GB GPU and 64 GB of RAM: refused, offering 4 bits; 4 bits there: loads whole."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    big, meta = model_72b
    extra = compute_module_sizes(meta, dtype=torch.bfloat16)[""] - BYTES_72B  # buffers (rotary frequencies)
    assert {bits: placement.stored_bytes(meta, "bfloat16", bits) - extra for bits in (4, 8)} == BITS_72B
    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused", model_name_or_path=str(big),
                                           quantization_bit=4))
    options = SelectionOptions(**OPTIONS, teacher=str(assets.teacher), dtype="bfloat16")
    pairs, _ = prepare(recipe_args, options)
    monkeypatch.setattr(placement, "free_memory", lambda device: {"cpu": 23 * 10**9})
    with pytest.raises(ValueError) as caught:
        score_head_neighbours(recipe_args, options, pairs)
    assert str(caught.value) == (
        f"model_name_or_path: {big}: head selection needs 41.6 GB for the model in 4 bits (bitsandbytes; the rest in "
        "bfloat16) whole on cpu and 21.5 GB of CPU RAM for its o_proj weights in float32, 90% of the free memory "
        "usable: cpu has 23.0 GB. Free memory, select on a machine with more (llamafactory-hera select RECIPE) and "
        "list its heads in hera_heads.")
    reserve = (80 * 8192 * 8192 * 4, "its o_proj weights in float32")
    monkeypatch.setattr(placement, "free_memory", lambda device: {0: 80 * 10**9, "cpu": 64 * 10**9})
    with pytest.raises(ValueError) as caught:
        placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", reserve=reserve, bits=8)
    assert str(caught.value).startswith(f"model_name_or_path: {big}: head selection needs 75.9 GB for the model in 8 "
                                        "bits (bitsandbytes; the rest in bfloat16) whole on cuda:0 and 21.5 GB")
    assert str(caught.value).endswith(f"{placement.FIX}, or set quantization_bit: 4 (41.6 GB).")
    capsys.readouterr()
    assert placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", reserve=reserve, bits=4) is None
    assert capsys.readouterr().out.strip().endswith("the model is 41.6 GB in 4 bits (bitsandbytes; the rest in "
                                                    "bfloat16); it fits whole on cuda:0 (80.0 GB free).")


CASES = [("text", "bfloat16"), ("multimodal", "float32")]
REFERENCE = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import base_recipe
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours
from llamafactory_hera_patches.tools.model_data import parse_recipe
from llamafactory_hera.fixtures import build_tiny_assets
assets = build_tiny_assets({root!r}, seed=0)
args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
scores = {{}}
for mode, dtype in {cases!r}:
    options = SelectionOptions(**{options!r}, teacher=str(assets.teacher), mode=mode, dtype=dtype)
    pairs, _ = prepare(args, options)
    scores[mode + "-" + dtype] = score_head_neighbours(args, options, pairs).scores.tolist()
print(json.dumps(scores))
"""


@pytest.fixture(scope="module")
def whole_model_scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The whole model's scores for each of :data:`CASES`, from one separate process (no offload, no patch), forked
    from the worker's warm process (tests/dist_runs.py ``run_python``)."""
    tests, folder = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("whole_model")
    script = folder / "reference.py"
    script.write_text(REFERENCE.format(tests=str(tests), root=str(tests.parent / ".hera_assets" / "tests"),
                                       options=OPTIONS, cases=CASES), encoding="utf-8")
    done = run_python(script, [], cwd=folder, env=offline_env(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: torch.tensor(scores) for case, scores in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize(("mode", "dtype"), CASES)
def test_offloaded_selection_equals_the_whole_model(assets, whole_model_scores, monkeypatch, capfd, mode: str,
                                                    dtype: str) -> None:
    """Budgets that hold part of the model in RAM put the other layers on disk (accelerate's AlignDevicesHook loads
    each one for its forward): the o_proj hooks and weights read the same values, so the scores and the chosen heads
    equal the whole-model selection's in a separate process, and the dispatched copy is freed. In bfloat16 the float32
    checkpoint is cast after the dispatch, each offloaded weight as accelerate loads it."""
    from accelerate.utils import compute_module_sizes, has_offloaded_params

    from llamafactory_hera_patches.tools.model_data import parse_recipe

    want = whole_model_scores[f"{mode}-{dtype}"]
    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    options = SelectionOptions(**OPTIONS, teacher=str(assets.teacher), mode=mode, dtype=dtype)
    pairs, _ = prepare(recipe_args, options)
    meta = check_model_structure(recipe_args.model_args.model_name_or_path, False)
    size = compute_module_sizes(meta, dtype=getattr(torch, dtype))[""]
    # RAM for 0.9 * 1.05 of the model less the o_proj reserve: the first blocks (the vision tower, ...) in RAM, at
    # least one decoder layer on disk (checked below)
    monkeypatch.setattr(placement, "free_memory", lambda device: {"cpu": size * 21 // 20, "disk": 10 * size})
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
    assert " GB on disk (offloaded: each batch copies the layers it runs " in capfd.readouterr().out
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


def test_a_4_bit_model_that_does_not_fit_is_not_told_to_set_its_own_4_bits(model_72b, monkeypatch) -> None:
    """4 bits without double quantization (Qwen2.5-VL-72B: its float32 absmax per 64 weights, more than the 41.6 GB
    with it) on a GPU of 48 GB (43.2 GB usable): refused, and the offer lists only fewer bits than the recipe's (none
    here); the 4 bits it has are no way out, though with double quantization they would fit."""
    big, meta = model_72b
    plain = placement.stored_bytes(meta, "bfloat16", 4, double_quant=False)
    assert placement.stored_bytes(meta, "bfloat16", 4) < 0.9 * 48e9 < plain
    monkeypatch.setattr(placement, "free_memory", lambda device: {0: 48 * 10**9, "cpu": 64 * 10**9})
    with pytest.raises(ValueError) as caught:
        placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", bits=4, double_quant=False)
    assert str(caught.value).startswith(f"model_name_or_path: {big}: head selection needs {placement.gb(plain)} for "
                                        "the model in 4 bits (bitsandbytes; the rest in bfloat16) whole on cuda:0")
    assert str(caught.value).endswith(f"{placement.FIX}.")


def test_a_4_bit_model_larger_than_its_gpu_is_refused_not_offloaded(model_72b, monkeypatch, capsys) -> None:
    """4 bits (41.6 GB) on a GPU with 40 GB free and 512 GB of RAM: refused naming the bytes. LLaMA-Factory loads a
    bitsandbytes model whole on its device, so it is never split over the GPU and the RAM, though the RAM could hold
    it (accelerate's map in the config's bf16 sizes, 146.8 GB, would fit the two)."""
    big, meta = model_72b
    monkeypatch.setattr(placement, "free_memory", lambda device: {0: 40 * 10**9, "cpu": 512 * 10**9})
    with pytest.raises(ValueError) as caught:
        placement.device_map_for(meta, str(big), "cuda:0", "bfloat16", bits=4)
    assert str(caught.value).startswith(f"model_name_or_path: {big}: head selection needs 41.6 GB for the model in 4 "
                                        "bits (bitsandbytes; the rest in bfloat16) whole on cuda:0, 90% of the free "
                                        "memory usable: cuda:0 has 40.0 GB, cpu has 512.0 GB."), caught.value
    assert "offloaded" not in capsys.readouterr().out


def test_rah_places_a_4_bit_model_by_its_codes(model_72b, monkeypatch, capsys) -> None:
    """RAH-LoRA on Qwen2.5-VL-72B with ``quantization_bit: 4`` on one 80 GB GPU: 41.6 GB in bitsandbytes' codes fits
    whole there, as LLaMA-Factory loads it (in bf16, 146.8 GB, it would be spread over the GPU and the CPU, which a
    bitsandbytes model is not)."""
    from llamafactory_hera.rah.workflow import placement as rah_placement

    big, _ = model_72b
    monkeypatch.setattr(placement, "free_memory", lambda device: {0: 80 * 10**9, "cpu": 64 * 10**9})
    args = SimpleNamespace(model_name_or_path=str(big), trust_remote_code=False, compute_dtype=torch.bfloat16,
                           quantization_bit=4, double_quantization=True)
    capsys.readouterr()
    assert rah_placement(args, "cuda:0") is None
    assert capsys.readouterr().out.strip().endswith("RAH-LoRA: the model is 41.6 GB in 4 bits (bitsandbytes; the "
                                                    "rest in bfloat16); it fits whole on cuda:0 (80.0 GB free).")
