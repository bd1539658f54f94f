"""The recipes for the hardware users have: the QLoRA twin of qwen3_8b_hera.yaml on one 24 GB GPU,
its FSDP2 twin with recipes/accelerate/fsdp2_config.yaml on a node of 8 GPUs, and the 2026 families' LoRA recipes.

- recipes/memory.py's bytes of a bitsandbytes-quantized model (4-bit nf4 with double quantization, fp4 without, 8-bit)
  against the bytes bitsandbytes itself stores for a model transformers quantizes as LLaMA-Factory asks it to.
- The shapes and sizes memory.py holds for these models against transformers' own classes, built on the meta device
  from the checkpoints' configs: parameters, linear weights (what bitsandbytes quantizes), one decoder layer (what
  FSDP2 gathers), tied output layers.
- The estimates: the QLoRA recipe under a 24 GB card's fit and its bf16 twin over it; the FSDP2 recipe under a 24 GB
  card where the same micro-batch unsharded is not; each header's figure is memory.py's.
- The accelerate config as accelerate reads it; the layer classes it shards are Qwen3-VL's.
- The 2026 families: model ids and templates as LLaMA-Factory's model table has them, and the same templates as the
  tiny models of those families that tests/test_families.py trains with HeRA.
- The QLoRA recipe's SFT twin trains 2 steps on a tiny Qwen3-VL in 4 bits (CPU, bitsandbytes); its HeRA run waits for
  HeRA's QLoRA support (skipped, for the lead to enable), as the FSDP2 recipe's run waits for FSDP2's.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fsdp_checks import FSDP_HOOK, accelerate_launch_runs, assert_fsdp2, fsdp_run
from test_accelerate_refusals import refused_in_process
from test_hera_recipes import MEMORY, _training_recipe

from conftest import REPO, engines_of, free_port, offline_env, read_trainer_log, run_train, saved_in_bf16
from llamafactory_hera.fixtures import TinyAssets

RECIPES = REPO / "recipes"
QWEN3_8B = MEMORY.backbone_of("qwen3_8b")
QLORA_CONFIG = "accelerate/fsdp2_qlora_config.yaml"  # the FSDP2 config for 4-bit recipes (efficient loading off)

# The checkpoints' text configs (their config.json on the Hub, not downloaded here) and vision towers, for
# transformers' classes on the meta device: stem -> (config class, kwargs).
QWEN3_TEXT = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}
SIGLIP_896 = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
              "vision_use_head": False}  # Gemma 3's SigLIP-So400m at 896 px
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_8b": ("Qwen3VLConfig", {"text_config": QWEN3_TEXT, "tie_word_embeddings": False}),
    # Qwen3.5-9B: transformers' Qwen3_5TextConfig defaults are that model's ("Qwen3.5-9B style configuration")
    "qwen3_5_9b": ("Qwen3_5Config", {"vision_config": {"out_hidden_size": 4096}}),
    "gemma3_12b": ("Gemma3Config", {"text_config": {
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208}, "vision_config": SIGLIP_896}),
    "internvl3_5_8b": ("InternVLConfig", {"text_config": {"model_type": "qwen3", **QWEN3_TEXT},
                                          "tie_word_embeddings": False}),  # InternViT-300M: the default tower
}


def _meta_model(stem: str) -> torch.nn.Module:
    import transformers

    name, kwargs = CONFIGS[stem]
    config = getattr(transformers, name)(**kwargs)
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(config)


def _linear_weights(model: torch.nn.Module) -> int:
    output = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output)


@pytest.mark.parametrize("stem", list(CONFIGS))
def test_shapes_and_sizes_are_the_models(stem: str) -> None:
    b = MEMORY.backbone_of(stem)
    model = _meta_model(stem)
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (
        b.layers, b.hidden, b.heads, b.kv_heads, b.head_dim, b.intermediate, b.vocab)
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    assert abs(params / 1e9 - b.params_b) < 0.005 * b.params_b, (params, b.params_b)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == b.tied
    # what bitsandbytes quantizes: every linear weight but the output layer; memory.py: params less the embeddings
    assert abs(_linear_weights(model) - (b.params_b * 1e9 - MEMORY.embedding_params(b))) < 0.01 * params
    if stem == "qwen3_8b":  # what FSDP2 gathers at a time: one decoder layer's linear weights
        layer = model.get_decoder().layers[0]
        assert sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)) == \
            MEMORY.layer_params(b)


@pytest.mark.parametrize(("bits", "quant_type", "double_quant"), [(4, "nf4", True), (4, "fp4", False), (8, "", False)])
def test_quantized_weight_bytes_are_what_bitsandbytes_stores(bits: int, quant_type: str, double_quant: bool,
                                                             tmp_path: Path) -> None:
    """A 2-layer Llama (width 512, MLP 2048, GQA 8/2, untied output layer) quantized by transformers with
    LLaMA-Factory's BitsAndBytesConfig: the bytes of every parameter as stored, with bitsandbytes' block scales
    (absmax, the nested absmax under double quantization) and 8-bit row scales, against memory.py's formula."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(torch.bfloat16)
    dense.save_pretrained(tmp_path)
    params = sum(p.numel() for p in dense.parameters())
    if bits == 4:  # as llamafactory/model/model_utils/quantization.py builds it
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_quant_storage=torch.bfloat16)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.bfloat16)
    stored, quantized = 0, 0
    for param in model.parameters():
        stored += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            quantized += 1
            stored += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
        if getattr(param, "SCB", None) is not None:
            quantized += 1
            stored += param.SCB.numel() * param.SCB.element_size()
    assert quantized == 2 * 7  # every linear layer of the 2 decoder layers, not the output layer

    backbone = MEMORY.Backbone("tiny", "", "tiny", "", "", "llama", params / 1e9, 2, 512, 8, 2, 64, 2048, 1024)
    recipe = {"quantization_bit": bits, "double_quantization": double_quant}
    estimate = MEMORY.stored_weight_bytes(backbone, recipe)
    assert abs(estimate - stored) < 0.005 * stored, (estimate, stored)
    assert stored < 0.75 * params * 2  # a real saving over bf16, whatever the tiny model's embedding share


def _header_gib(name: str) -> str:
    header = (RECIPES / name).read_text(encoding="utf-8").split("### model")[0]
    return re.search(r"# GPU memory, estimated: ~([\d.]+) GiB", header).group(1)


def test_the_qlora_recipe_fits_a_24gb_gpu_where_bf16_lora_does_not() -> None:
    qlora = MEMORY.load_recipe(MEMORY.QLORA)
    gib = MEMORY.estimate_gib(QWEN3_8B, qlora)
    bf16 = {key: value for key, value in qlora.items() if not key.startswith(("quantization", "double_quant"))}
    assert gib <= MEMORY.FIT_24GB_GIB < MEMORY.GPU_24GB_GIB < MEMORY.estimate_gib(QWEN3_8B, bf16)
    assert _header_gib(MEMORY.QLORA) == f"{gib:.1f}"
    # 4-bit: 4.13 bits per linear weight; the embeddings and output layer stay bf16
    stored = MEMORY.stored_weight_bytes(QWEN3_8B, qlora)
    assert stored < 0.4 * QWEN3_8B.params_b * 1e9 * 2


def test_the_fsdp2_recipe_fits_24gb_gpus_where_unsharded_it_does_not() -> None:
    recipe = MEMORY.load_recipe(MEMORY.FSDP2)
    gib = MEMORY.fsdp2_gib(QWEN3_8B, recipe)
    assert gib <= MEMORY.FIT_24GB_GIB and MEMORY.estimate_gib(QWEN3_8B, recipe) > MEMORY.GPU_24GB_GIB
    assert _header_gib(MEMORY.FSDP2) == f"{gib:.1f}"
    header = (RECIPES / MEMORY.FSDP2).read_text(encoding="utf-8").split("### model")[0]
    assert f"{MEMORY.FSDP2_GPUS} GPUs" in header and f"recipes/{MEMORY.FSDP2_CONFIG}" in header


def test_the_72b_fsdp2_recipe_fits_80gb_gpus_and_says_its_estimate() -> None:
    gib = MEMORY.fsdp2_gib(MEMORY.backbone_of("qwen2_5_72b"), MEMORY.load_recipe(MEMORY.FSDP2_72B))
    assert gib <= MEMORY.FIT_GIB and _header_gib(MEMORY.FSDP2_72B) == f"{gib:.1f}"


@pytest.mark.parametrize("stem", [b.stem for b in MEMORY.FAMILIES_2026])
def test_a_2026_family_recipe_fits_and_says_its_estimate(stem: str) -> None:
    name = f"{stem}_hera.yaml"
    gib = MEMORY.estimate_gib(MEMORY.backbone_of(stem), MEMORY.load_recipe(name))
    assert gib <= MEMORY.FIT_GIB and _header_gib(name) == f"{gib:.0f}"


def test_the_fsdp2_accelerate_config_is_what_accelerate_reads() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = RECIPES / MEMORY.FSDP2_CONFIG
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).endswith("FSDP") and config.num_processes == MEMORY.FSDP2_GPUS
    assert config.num_machines == 1 and config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # SHARDED: no adapter
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and not fsdp["fsdp_offload_params"]
    assert not fsdp["fsdp_activation_checkpointing"]  # the recipe's (LLaMA-Factory's) gradient checkpointing instead
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped == set(_meta_model("qwen3_8b")._no_split_modules)  # Qwen3-VL's decoder layer and vision block
    recipe = MEMORY.load_recipe(MEMORY.FSDP2)
    assert recipe["bf16"] and recipe["model_name_or_path"] == QWEN3_8B.model_id
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["fsdp_config"] == fsdp  # nothing accelerate drops
    # the QLoRA twin: the same but for the efficient loading, which 4-bit loading cannot do (N11), named by the QLoRA
    # recipe's header
    shipped, qlora = (yaml.safe_load((RECIPES / name).read_text(encoding="utf-8")) for name in (MEMORY.FSDP2_CONFIG,
                                                                                               QLORA_CONFIG))
    shipped["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    assert qlora == shipped
    command = f"accelerate launch --config_file recipes/{QLORA_CONFIG} -m llamafactory.launcher recipes/{MEMORY.QLORA}"
    # with the accumulation that keeps the recipe's 128 samples per step on 8 GPUs (4 x 4 x 8)
    header = (RECIPES / MEMORY.QLORA).read_text(encoding="utf-8")
    assert f"#   {command} \\\n#     gradient_accumulation_steps=4\n" in header


@pytest.mark.parametrize(("name", "model_class"), [(MEMORY.FSDP2, "Qwen3VLForConditionalGeneration"),
                                                   (MEMORY.FSDP2_72B, "Qwen2_5_VLForConditionalGeneration")])
def test_accelerate_launch_of_the_fsdp2_recipe_gives_its_ranks_fsdp2(name: str, model_class: str) -> None:
    """The recipe header's command as accelerate parses it: the environment it gives each rank (what transformers'
    Trainer reads to shard with FSDP2, the layer classes its model has), and a module that runs LLaMA-Factory's
    training on the recipe."""
    import importlib.util

    import transformers
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    header = (RECIPES / name).read_text(encoding="utf-8").split("### model")[0]
    command = next(line[4:] for line in header.splitlines() if line.startswith("#   accelerate launch "))
    args = launch_command_parser().parse_args(command.split()[2:])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"]) == (
        "true", "2", "FULL_STATE_DICT")
    wrapped = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    assert sorted(wrapped) == sorted(getattr(transformers, model_class)._no_split_modules)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and args.num_processes == MEMORY.FSDP2_GPUS
    assert args.module and args.training_script == "llamafactory.launcher"
    assert args.training_script_args == [f"recipes/{name}"]
    launcher = Path(importlib.util.find_spec("llamafactory.launcher").origin).read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in launcher and "run_exp()" in launcher.split('if __name__ == "__main__":')[1]


def test_the_2026_families_use_llamafactorys_ids_and_templates() -> None:
    from llamafactory.extras.constants import DEFAULT_TEMPLATE, SUPPORTED_MODELS

    from llamafactory_hera_testing.families import EXTRA_FAMILIES
    from llamafactory_hera_testing.zoo import ZOO

    names = {source: name for name, sources in SUPPORTED_MODELS.items() for source in sources.values()}
    tiny = {"qwen3_5": ZOO["qwen3_5"][0], "gemma3": ZOO["gemma3"][0],  # the tiny families tests train with HeRA
            "internvl": EXTRA_FAMILIES["internvl_qwen3"].template}
    for b in MEMORY.FAMILIES_2026:
        assert DEFAULT_TEMPLATE[names[b.model_id]] == b.template, b.model_id
        assert tiny[b.model_type] == b.template, b.model_id


def _qlora_run(assets: TinyAssets, tmp: Path, stage: str) -> tuple[Any, Path]:
    pytest.importorskip("bitsandbytes")
    out = tmp / "out"
    recipe = _training_recipe(MEMORY.QLORA, assets.models["qwen3_vl"], assets, out)
    recipe.update({"stage": stage, "per_device_train_batch_size": 4})  # under hera_k + 1 = 6: the queue, as the recipe
    assert recipe["quantization_bit"] == 4 and recipe["quantization_type"] == "nf4"
    return run_train(recipe, tmp, check=False), out


def test_the_qlora_recipes_sft_twin_trains_in_4_bits(assets: TinyAssets, tmp_path: Path) -> None:
    proc, out = _qlora_run(assets, tmp_path, "sft")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Quantizing model to 4 bit with bitsandbytes" in proc.stdout + proc.stderr
    assert [line["current_steps"] for line in read_trainer_log(out) if "loss" in line] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file()


def test_the_qlora_recipe_trains_with_hera(assets: TinyAssets, tmp_path: Path) -> None:
    proc, out = _qlora_run(assets, tmp_path, "hera")
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = [line for line in read_trainer_log(out) if "loss" in line]
    assert [line["current_steps"] for line in lines] == [1, 2] and all("hera_loss" in line for line in lines)
    assert all(line["hera_queue_size"] > 0 for line in lines)  # the feature queue extends the set of 4


@pytest.mark.parametrize(("quantized", "stage", "bf16"), [(False, "hera", True), (True, "hera", True),
                                                     (True, "sft", True), (True, "hera", False)],
                         ids=["lora", "qlora", "qlora_sft_twin", "qlora_without_bf16"])
def test_the_fsdp2_recipe_trains_with_hera_on_two_ranks(assets: TinyAssets, tmp_path: Path, quantized: bool,
                                                        stage: str, bf16: bool) -> None:
    """The recipe header's command, ``accelerate launch --config_file ... -m llamafactory.launcher RECIPE``, on two CPU
    ranks: the accelerate config as shipped but for 2 processes on the CPU (``mixed_precision: bf16``: FSDP2 gathers
    the weights in bf16, its MixedPrecisionPolicy, asserted from each rank), the recipe as shipped (``bf16: true``,
    with ``use_cpu: true`` so that transformers takes bf16 on the CPU) but for the tiny model and data (per-device
    4 x 2 ranks gathered = 8 >= hera_k + 1 = 6: no queue, as the recipe). ``qlora``: the QLoRA recipe
    (qwen3_8b_hera_qlora.yaml, ``quantization_bit: 4``, nf4, double quantization) with the config its header names,
    recipes/accelerate/fsdp2_qlora_config.yaml (``fsdp_cpu_ram_efficient_loading: false``), both as shipped but for
    the same changes, on a checkpoint saved in bf16 (so the 4-bit codes are stored in bf16, LLaMA-Factory's
    ``bnb_4bit_quant_storage``, and FSDP2 shards them); each 4-bit
    layer's codes reach the forward as loaded (patches/engines/fsdp_qlora.py: accelerate's mixed-precision upcast
    changed
    them, the SFT twin's too). ``qlora_sft_twin``: the recipe's baseline twin (``stage: sft``), a stock stage, keeps
    them too (its ranks forked from the warm process with the variables accelerate gives them, tests/warm_launch.py).
    ``qlora_without_bf16``: the recipe without ``bf16: true`` on the float32 checkpoint stores the codes in float32,
    which the config's bf16 all-gather would convert as numbers: refused before loading by the launching process
    (patches/engines/fsdp_loading.py; patches/engines/fsdp_qlora.py checks the loaded model the same way), whose
    accelerate code runs in this process up to the agent's start."""
    import subprocess
    import sys

    if quantized:
        pytest.importorskip("bitsandbytes")
    config = yaml.safe_load((RECIPES / (QLORA_CONFIG if quantized else MEMORY.FSDP2_CONFIG)).read_text("utf-8"))
    config.update({"num_processes": 2, "use_cpu": True, "main_process_port": free_port()})  # the cases run at once
    (tmp_path / "fsdp2_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "out"
    model = saved_in_bf16(assets.models["qwen3_vl"], tmp_path / "model") if quantized and bf16 else (
        assets.models["qwen3_vl"])
    recipe = _training_recipe(MEMORY.QLORA if quantized else MEMORY.FSDP2, model, assets, out)
    recipe["per_device_train_batch_size"] = 4
    recipe.update({"bf16": bf16, "use_cpu": True, "stage": stage})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    # the test-only shim (tests/fsdp_cpu) keeps FSDP2 on, on CPU, where accelerate 1.11 would train plain DDP; the
    # evidence it writes proves every trainable parameter was a DTensor at the step and at save
    path = os.pathsep.join(filter(None, [str(FSDP_HOOK), os.environ.get("PYTHONPATH")]))
    env = offline_env(tmp_path, engines=engines_of(recipe), PYTHONPATH=path, HERA_TEST_FSDP_ON_CPU="1",
                      HERA_TEST_FSDP_EVIDENCE=str(tmp_path / "fsdp"))
    if not bf16:  # refused by accelerate launch's own process: its code runs here up to the agent, which never starts
        # (tests/test_accelerate_refusals.py, which launches one refusal for real)
        refusal = ("4-bit weights under FSDP2: the codes are stored as torch.float32 and the accelerate config's mixed "
                   "precision gathers them as torch.bfloat16, which converts them")
        assert refused_in_process(["--config_file", str(tmp_path / "fsdp2_config.yaml"), "-m", "llamafactory.launcher",
                                   str(tmp_path / "recipe.yaml")], env).startswith(refusal)
        assert not (out / "adapter_model.safetensors").exists()
        return
    if stage == "sft":  # the same config's ranks forked from the warm process: [qlora] launches it for real
        accelerate_launch_runs([fsdp_run(recipe, tmp_path)], tmp_path, config=tmp_path / "fsdp2_config.yaml")
    else:
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               "fsdp2_config.yaml", "-m", "llamafactory.launcher", "recipe.yaml"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900, check=False, env=env)
    assert stage == "sft" or proc.returncode == 0, proc.stderr[-5000:]
    lines = [line for line in read_trainer_log(out) if "loss" in line]
    assert [line["current_steps"] for line in lines] == [1, 2]
    if stage == "hera":
        assert all(math.isfinite(line["hera_loss"]) and line["hera_loss"] > 0 for line in lines), lines
        # the log counts a rank's own image rows per micro-batch (as tests/hera/test_hera_distributed.py reads it);
        # the contrastive set gathers both ranks' 4
        assert all(line["hera_image_samples"] == 4 for line in lines)
    assert (out / "adapter_model.safetensors").is_file()  # FULL_STATE_DICT: the adapter is written whole
    records = assert_fsdp2(tmp_path, {"step", "save"})
    assert {(r["param_dtype"], r["offload_to_cpu"]) for r in records} == {("torch.bfloat16", False)}
    assert {(r["o_proj_class"], r["o_proj_dtype"]) for r in records} == (
        {("Linear4bit", "torch.bfloat16")} if quantized else {("Linear", "torch.float32")})
    if quantized:  # every 4-bit layer's codes, as the all-gather hands them to the forward, are those loaded
        # (accelerate's upcast changed them before patches/engines/fsdp_qlora.py)
        first = [r for r in records if r["event"] == "step" and r["step"] == 0]
        assert len(first) == 2 and all(r["packed_layers"] > 0 and r["packed_changed"] == 0 for r in first), first
