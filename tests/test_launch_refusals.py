"""At scale: inputs that used to pass the pre-flight and end the run late, after the model (and HeRA's
teacher) loaded, or with an unrelated message or a traceback. Each is now one line naming the key, the value and the
fix, raised before anything loads, through LLaMA-Factory's real ``run_exp`` (``no_model_load`` fails the test if the
model loads first). Shared checks: ``recipe/raw_checks.py`` (raw recipe and environment), ``recipe/raw_checks.py``
(parsed arguments). Each is one the command line prints alone (``job_refusal.raised_by_plugin``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, base_recipe, harc_recipe, run_verb, saved_in_bf16
from llamafactory_hera.demo.rah import build_rah_recipe
from llamafactory_hera.job_refusal import raised_by_plugin
from llamafactory_hera.recipe.raw_checks import LIGER
from llamafactory_hera.runtime.errors import RecipeError

STAGES = ("hera", "rah", "harc")



def _recipe(stage: str, assets: Any, harc_assets: Any, out: Path, **overrides: Any) -> dict[str, Any]:
    if stage == "hera":
        recipe = base_recipe(assets, "qwen2_5_vl", out)
    elif stage == "rah":
        recipe = build_rah_recipe(assets, "qwen2_5_vl", out)
    else:
        recipe = harc_recipe(harc_assets, "llama3", out)
    recipe.update(overrides)
    return {k: v for k, v in recipe.items() if v is not None}


def _refused(recipe: dict[str, Any]) -> str:
    from llamafactory.train.tuner import run_exp

    with pytest.raises(ValueError) as error:
        run_exp(recipe)
    message = str(error.value)
    assert "\n" not in message, message
    assert raised_by_plugin(error.value), "llamafactory-cli would print a traceback, not the message alone"
    return message


_LAUNCHED = "set by accelerate launch with an FSDP config"
_FSDP2 = {"ACCELERATE_USE_FSDP": "True", "FSDP_VERSION": "2"}
FSDP_SOURCES = {  # name -> (recipe overrides, environment, what the message starts with for hera / harc)
    "fsdp key": ({"fsdp": "full_shard auto_wrap"}, {}, "fsdp: full_shard auto_wrap: stage: {stage} runs under FSDP2 "
                 "started by accelerate launch, not by the recipe's fsdp key"),
    "fsdp with fsdp_config": ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}, {},
                              "fsdp: full_shard (fsdp_config: {{'fsdp_version': 2}}, FSDP version 2): stage: {stage} "
                              "runs under FSDP2 started by accelerate launch"),
    "accelerate FSDP1": ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
                         f"ACCELERATE_USE_FSDP=true (FSDP_VERSION=1), {_LAUNCHED}: stage: {{stage}} is not run under "
                         "FSDP1 ("),
    "accelerate FSDP2, sharded state dict": ({}, {**_FSDP2, "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"},
                                             f"ACCELERATE_USE_FSDP=True (FSDP_VERSION=2), {_LAUNCHED}, "
                                             "FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT: stage: {stage} would exit 0 "
                                             "with no adapter or model saved (transformers' Trainer writes"),
    "accelerate FSDP2, default state dict": ({}, _FSDP2, f"ACCELERATE_USE_FSDP=True (FSDP_VERSION=2), {_LAUNCHED}, "
                                             "no FSDP_STATE_DICT_TYPE (accelerate's FSDP2 default: "
                                             "SHARDED_STATE_DICT): stage: {stage} would exit 0 with no adapter"),
    # the one FSDP that runs HeRA and HARC (tests/hera/test_hera_fsdp2.py, tests/harc/test_harc_stage.py)
    "accelerate FSDP2, full state dict": ({}, {**_FSDP2, "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, None),
}


@pytest.mark.parametrize("source", list(FSDP_SOURCES))
@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_that_does_not_run_is_refused_naming_why(stage: str, source: str, assets: Any, harc_assets: Any,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      no_model_load: None) -> None:
    """Once every FSDP was refused (HeRA's check read ``training_args.fsdp`` only and once failed at the
    first projection). Now FSDP2 from ``accelerate launch`` with a full state dict runs HeRA and HARC; a sharded state
    dict (the run exits 0 with nothing saved, stock SFT too), FSDP1, the recipe's ``fsdp`` key and RAH-LoRA under any
    FSDP are refused before loading, naming the value and the fix (recipe/fsdp.py)."""
    overrides, environment, start = FSDP_SOURCES[source]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    if stage == "rah":
        message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **overrides))
        assert "stage: rah runs as one process that places the model over every visible GPU; run it so: " \
            "llamafactory-cli train RECIPE with FORCE_TORCHRUN unset" in message, message
        return
    if start is None:
        from llamafactory_hera.recipe.raw_checks import check_raw_launch

        check_raw_launch(stage, _recipe(stage, assets, harc_assets, tmp_path / "out", **overrides), environment)
        return
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **overrides))
    assert message.startswith(start.format(stage=stage)), message
    fix = ("launch with accelerate launch --config_file" if source.startswith("fsdp ") else "set fsdp_version: 2"
           if source == "accelerate FSDP1" else "set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config")
    assert message.endswith(".") and fix in message, message


@pytest.mark.parametrize("value", [None, "SHARDED_STATE_DICT", "3"])
def test_a_stock_stage_that_saves_no_adapter_under_fsdp_is_said_not_refused(value: str | None, assets: Any,
                                                                            tmp_path: Path) -> None:
    """Stock ``stage: sft`` under accelerate's FSDP2 default (SHARDED_STATE_DICT) trains and exits 0 with sharded
    checkpoints and no adapter, as without the plugin: not refused, one warning line saying what is saved and what is
    not (the run: tests/test_stock_stages_distributed.py); FULL_STATE_DICT says nothing."""
    from llamafactory_hera_patches.engines.fsdp_adapter import unsaved_refusal
    from llamafactory_hera_patches.recipe.raw_checks import check_host_stage

    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", **({"FSDP_STATE_DICT_TYPE": value} if value else {})}
    recipe = {k: v for k, v in {**_recipe("hera", assets, None, tmp_path / "out"), "stage": "sft"}.items()
              if not k.startswith("hera_")}
    check_host_stage(recipe, environ)
    shown = f"FSDP_STATE_DICT_TYPE={value}" if value else "no FSDP_STATE_DICT_TYPE (accelerate's FSDP2 default: " \
        "SHARDED_STATE_DICT)"
    assert unsaved_refusal("sft", environ, note=True) == (
        "[llamafactory-hera] warning: ACCELERATE_USE_FSDP=true (FSDP_VERSION=2), set by accelerate launch with an FSDP "
        f"config, {shown}: stage: sft saves only resumable sharded checkpoints (checkpoint-N/pytorch_model_fsdp_0/), "
        "no adapter or model (transformers' Trainer writes them under FSDP only with FULL_STATE_DICT); set "
        "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config to have them.")
    for full in ("FULL_STATE_DICT", "1", "full_state_dict"):
        assert unsaved_refusal("sft", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                       "FSDP_STATE_DICT_TYPE": full}, note=True) is None
    assert unsaved_refusal("sft", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}) is None  # FSDP1's default


@pytest.mark.parametrize("stage", ["hera", "harc", "sft"])
def test_fsdp2_with_bitsandbytes_weights_that_fail_after_loading_is_refused_before_loading(
        stage: str, assets: Any, harc_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        no_model_load: None) -> None:
    """Under FSDP2, for the plugin's stages and the host's, before loading, with the fix:
    - ``quantization_bit: 4`` with LLaMA-Factory's FSDP2 example config (``fsdp_cpu_ram_efficient_loading: true``)
      failed after loading the model in accelerate 1.11's fsdp2_load_full_state_dict (`weight` is not an nn.Module),
      stock SFT too; with ``false`` it trains (tests/hera/test_hera_fsdp2.py, tests/harc/test_harc_stage.py);
    - ``quantization_bit: 8`` failed in torch's fully_shard, whatever the loading ("only Tensors of floating point
      dtype can require gradients"), stock SFT too, and so did a checkpoint saved with int8 codes or with 4-bit codes
      in bitsandbytes' default uint8 storage (not one whose codes are stored in a float dtype), local or a Hub id.
    Whichever way accelerate spells true; not refused without quantization, at 4-bit with the efficient loading off,
    under FSDP1, for another quantization method, or (4-bit) on a newer accelerate."""
    from importlib.metadata import version

    from llamafactory_hera_patches.engines import fsdp_loading

    environment = {**_FSDP2, "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    recipe = _recipe("hera" if stage == "hera" else "harc", assets, harc_assets, tmp_path / "out")
    if stage == "sft":
        recipe = {**{k: v for k, v in recipe.items() if not k.startswith("harc_")}, "dataset": "harc_harmless"}
    message = _refused({**recipe, "stage": stage, "quantization_bit": 4})
    assert message == ("quantization_bit: 4 under FSDP2 with fsdp_cpu_ram_efficient_loading: true "
                       "(FSDP_CPU_RAM_EFFICIENT_LOADING=true, set by accelerate launch): accelerate "
                       f"{version('accelerate')} cannot hand each rank its shards of a bitsandbytes-quantized model "
                       f"(stage: {stage} would fail after loading the model, in fsdp2_load_full_state_dict, as stock "
                       "SFT does); set fsdp_cpu_ram_efficient_loading: false in the accelerate config, as the plugin's "
                       "recipes/accelerate/fsdp2_qlora_config.yaml does."), message
    shipped = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp2_qlora_config.yaml").read_text(encoding="utf-8"))
    assert shipped["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False  # the config the line names runs it
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    message = _refused({**recipe, "stage": stage, "quantization_bit": 8})
    assert message == ("quantization_bit: 8 under FSDP2 (ACCELERATE_USE_FSDP, set by accelerate launch with an FSDP "
                       "config): FSDP2 cannot shard bitsandbytes' int8 weights (torch's fully_shard makes each weight "
                       f"a parameter that could require gradients, which int8 cannot; stage: {stage} fails on it, as "
                       "stock SFT does); use quantization_bit: 4 (QLoRA under FSDP2, with "
                       "fsdp_cpu_ram_efficient_loading: false in the accelerate config), or 8-bit on one GPU or under "
                       "DDP / DeepSpeed ZeRO-2."), message
    # a checkpoint saved quantized: its int8 or uint8-stored 4-bit codes fail in fully_shard the same way (stock SFT
    # on a saved 4-bit uint8 checkpoint, two CPU ranks: "only Tensors of floating point dtype can require gradients")
    source = Path(recipe["model_name_or_path"])
    for name, saved, codes in (("int8", {"load_in_8bit": True}, "int8 codes"),
                               ("uint8", {"load_in_4bit": True}, "4-bit codes stored as uint8")):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = {"quant_method": "bitsandbytes", **saved}
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        message = _refused({**recipe, "stage": stage, "model_name_or_path": str(folder)})
        assert message.startswith(f"model_name_or_path: {folder} is saved quantized by bitsandbytes with {codes} "
                                  "(quantization_config in its config.json), which FSDP2 cannot shard"), message
        assert message.endswith("train the unquantized checkpoint with quantization_bit: 4 (LLaMA-Factory stores the "
                                "codes in the compute dtype, which FSDP2 shards), or this one on one GPU or under "
                                "DDP / DeepSpeed ZeRO-2."), message
    # the same checkpoint as a Hub id, its config.json read as LLaMA-Factory reads it (offline here: from the Hub cache
    # in the recipe's cache_dir, at its model_revision's commit)
    hub = tmp_path / "hub" / "models--someone--saved-4bit"
    (hub / "snapshots" / "0123abc").mkdir(parents=True)
    shutil.copy(tmp_path / "uint8" / "config.json", hub / "snapshots" / "0123abc" / "config.json")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0123abc", encoding="utf-8")
    message = _refused({**recipe, "stage": stage, "model_name_or_path": "someone/saved-4bit",
                        "cache_dir": str(tmp_path / "hub")})
    assert message.startswith("model_name_or_path: someone/saved-4bit is saved quantized by bitsandbytes with 4-bit "
                              "codes stored as uint8"), message
    refusal = fsdp_loading.bitsandbytes_refusal
    hub_id = {"model_name_or_path": "someone/saved-4bit", "cache_dir": str(tmp_path / "hub")}
    for other in ({"model_revision": "v2"}, {"cache_dir": str(tmp_path)}):
        assert refusal("sft", {**hub_id, **other}, environment) is None, other  # not that file: LLaMA-Factory's turn
    assert refusal("sft", ["--model-name-or-path", "someone/saved-4bit", "--cache-dir", str(tmp_path / "hub")],
                   environment)  # the command line's spelling, as transformers' parser reads it
    # a ModelScope / Modelers id (LLaMA-Factory's USE_MODELSCOPE_HUB / USE_OPENMIND_HUB) is not looked up on the Hub;
    # a local folder is read whichever hub is set, as LLaMA-Factory reads it
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert refusal("sft", hub_id, environment) is None
    assert refusal("sft", {"model_name_or_path": str(tmp_path / "int8")}, environment)
    monkeypatch.delenv("USE_MODELSCOPE_HUB")
    # LLaMA-Factory loads a checkpoint saved quantized as saved, quantization_bit or not: its uint8 codes are refused
    # with bf16: true and quantization_bit: 4 or 8 alike
    for bits in (4, 8):
        message = refusal("sft", {**hub_id, "quantization_bit": bits, "bf16": True}, environment)
        assert message.startswith("model_name_or_path: someone/saved-4bit is saved quantized by bitsandbytes with "
                                  "4-bit codes stored as uint8"), message
    saved_bf16 = tmp_path / "uint8" / "config.json"  # the same checkpoint with its codes stored in bf16: sharded
    config = json.loads(saved_bf16.read_text(encoding="utf-8"))
    config["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"
    saved_bf16.write_text(json.dumps(config), encoding="utf-8")
    assert refusal("sft", {"model_name_or_path": str(saved_bf16.parent)}, environment) is None
    assert refusal("sft", {"model_name_or_path": str(tmp_path / "int8")}, {**environment, "FSDP_VERSION": "1"}) is None
    assert refusal("sft", {"quantization_bit": "4"}, {**environment, "FSDP_CPU_RAM_EFFICIENT_LOADING": "yes"})
    assert refusal("sft", {"quantization_bit": 8}, environment)
    for args, environ in (({}, environment), ({"quantization_bit": 4},
                                              {**environment, "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}),
                          ({"quantization_bit": 4}, {**environment, "FSDP_VERSION": "1"}),
                          ({"quantization_bit": 8}, {**environment, "FSDP_VERSION": "1"}),
                          ({"quantization_bit": 4, "quantization_method": "hqq"}, environment)):
        assert refusal("sft", args, environ) is None, (args, environ)
    monkeypatch.setattr(fsdp_loading, "NEWEST_FAILING", fsdp_loading.Version("1.0"))
    assert refusal("sft", {"quantization_bit": 4}, environment) is None


@pytest.mark.parametrize("stage", ["hera", "sft"])
def test_fsdp2_codes_the_all_gather_would_convert_are_refused_before_loading(
        stage: str, assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_load: None) -> None:
    """4-bit codes stored in another dtype than FSDP2's mixed-precision all-gather are converted as numbers at every
    forward (docs/configurations.md N19): refused before loading, from the dtype LLaMA-Factory will store them in (its
    compute dtype: the recipe's bf16 / fp16, else its infer_optim_dtype of the checkpoint's dtype on this device; a
    checkpoint saved 4-bit's bnb_4bit_quant_storage) and the all-gather's (the recipe's flag, else accelerate's
    mixed_precision). After loading, patches/engines/fsdp_qlora.py checks the same on the model
    (test_hera_recipe_hardware)."""
    from llamafactory.extras import misc

    from llamafactory_hera_patches.engines import fsdp_loading

    environment = {**_FSDP2, "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
                   "ACCELERATE_MIXED_PRECISION": "bf16"}
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    recipe = {**_recipe("hera", assets, None, tmp_path / "out"), "stage": stage, "quantization_bit": 4}
    if stage == "sft":
        recipe = {k: v for k, v in recipe.items() if not k.startswith("hera_")}
    # the recipe without bf16 on the float32 checkpoint, on this CPU: LLaMA-Factory stores the codes in float32
    message = _refused(recipe)
    assert message.startswith("4-bit weights under FSDP2: the codes are stored as torch.float32 and the accelerate "
                              "config's mixed precision gathers them as torch.bfloat16, which converts them as numbers "
                              "at every forward"), message
    refusal = fsdp_loading.bitsandbytes_refusal
    model = recipe["model_name_or_path"]
    for flags in ({"bf16": True}, {"fp16": "true"}, {"pure_bf16": True}):  # the flag sets both dtypes
        assert refusal(stage, {"model_name_or_path": model, "quantization_bit": 4, **flags}, environment) is None
    assert refusal(stage, {"model_name_or_path": model, "quantization_bit": 4},
                   {**environment, "ACCELERATE_MIXED_PRECISION": "no"}) is None
    # on a GPU with bf16 (LLaMA-Factory's device flags): a bf16 checkpoint's codes are bf16, a float32 one's fp16
    monkeypatch.setattr(misc, "_is_bf16_available", True)
    monkeypatch.setattr(misc, "_is_fp16_available", True)
    bf16_model = saved_in_bf16(Path(model), tmp_path / "bf16")
    assert refusal(stage, {"model_name_or_path": str(bf16_model), "quantization_bit": 4}, environment) is None
    assert "the codes are stored as torch.float16 and the accelerate config's mixed precision gathers them as " \
        "torch.bfloat16" in refusal(stage, {"model_name_or_path": model, "quantization_bit": 4}, environment)
    # the command line's spelling: --pure-bf16 sets the codes' dtype (not the all-gather's), --bf16 y both
    for flags in (["--pure-bf16", "true"], ["--bf16", "y"], ["--bf16", "false", "--bf16", "t"]):
        assert refusal(stage, ["--model_name_or_path", model, "--quantization-bit", "4", *flags], environment) is None
    # a checkpoint saved 4-bit keeps its storage whatever the recipe says (quantization_bit included)
    config = json.loads((bf16_model / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = config["dtype"] = "float16"
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_storage": "bfloat16"}
    (bf16_model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert refusal(stage, {"model_name_or_path": str(bf16_model), "quantization_bit": 4}, environment) is None
    config["quantization_config"]["bnb_4bit_quant_storage"] = "float16"
    (bf16_model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert refusal(stage, {"model_name_or_path": str(bf16_model), "pure_bf16": True},
                   {**environment, "ACCELERATE_MIXED_PRECISION": "no"}) is None  # pure_bf16 gathers nothing
    for storage, flags, refused in (("float32", {}, "the accelerate config's mixed precision"),
                                    ("float32", {"bf16": True}, "the recipe's bf16: true"),
                                    ("bfloat16", {}, None), ("bfloat16", {"bf16": True}, None)):
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                         "bnb_4bit_quant_storage": storage}
        (bf16_model / "config.json").write_text(json.dumps(config), encoding="utf-8")
        message = refusal(stage, {"model_name_or_path": str(bf16_model), **flags}, environment)
        assert message is None if refused is None else f"stored as torch.float32 and {refused} gathers" in message


def test_fsdp_version_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    """``fsdp_config``'s version: ``version`` or ``fsdp_version``, in a dict or a JSON file, 1 when absent, named in
    the refusal of the recipe's ``fsdp`` key."""
    from types import SimpleNamespace

    from llamafactory_hera.recipe.fsdp import check_fsdp_parsed
    from llamafactory_hera.recipe.raw_checks import check_raw_launch

    config_file = tmp_path / "fsdp.json"
    config_file.write_text(json.dumps({"fsdp_version": 2}), encoding="utf-8")
    for config, version in (({"version": 2}, "2"), (str(config_file), "2"), ({"fsdp_version": 1}, "1")):
        with pytest.raises(ValueError, match=f", FSDP version {version}\\): stage: harc runs under FSDP2 started"):
            check_raw_launch("harc", {"fsdp": "full_shard", "fsdp_config": config}, {})
    with pytest.raises(ValueError, match=r"^fsdp: full_shard: stage: harc runs under FSDP2 started by accelerate"):
        check_raw_launch("harc", {"fsdp": "full_shard", "fsdp_config": None}, {})
    parsed = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 2})
    with pytest.raises(ValueError, match=r"^fsdp: full_shard: stage: hera runs under FSDP2 started by accelerate"):
        check_fsdp_parsed("hera", parsed)


def test_fsdp_off_in_the_environment_is_not_refused() -> None:
    from llamafactory_hera.recipe.raw_checks import check_raw_launch

    # accelerate 1.11 turns FSDP on for ACCELERATE_USE_FSDP "true" (any case) only: "1" is no FSDP run (review)
    for value in ("false", "0", "", "1"):
        check_raw_launch("hera", {"fsdp": "", "fsdp_config": None}, {"ACCELERATE_USE_FSDP": value})
    # fsdp_config without fsdp: transformers warns and ignores it
    check_raw_launch("hera", {"fsdp": "", "fsdp_config": {"fsdp_version": 2}}, {})
    check_raw_launch("harc", ["--fsdp", ""], {"FSDP_VERSION": "2"})  # a version alone does not turn FSDP on


@pytest.mark.parametrize("stage", STAGES)
def test_streaming_is_refused_naming_why(stage: str, assets: Any, harc_assets: Any, tmp_path: Path,
                                         no_model_load: None) -> None:
    """HeRA: accelerate's dispatcher concatenates streamed batches and HeRA's list-valued keys raise TypeError, even
    on one process; HARC and RAH-LoRA ended in a bare StopIteration (they draw rows by index)."""
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", streaming=True, max_steps=3,
                               max_samples=None))
    assert message.startswith(f"streaming: true is not supported by stage: {stage} ("), message
    assert message.endswith("Remove streaming: the datasets are read once and cached on disk.")


def _without_file(dataset_dir: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    copy = tmp_path / "data"
    shutil.copytree(dataset_dir, copy)
    missing = copy / json.loads((copy / "dataset_info.json").read_text())[name]["file_name"]
    missing.unlink()
    return copy, missing


def _checkpointless(tmp_path: Path) -> str:
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    return str(folder)


def _without_images(dataset_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny image-caption dataset whose image files are gone (its rows still name them)."""
    copy = tmp_path / "data"
    shutil.copytree(dataset_dir, copy)
    shutil.rmtree(copy / "images")
    return copy


# (stage, overrides or a function of (assets, harc_assets, tmp_path) giving them, what the message starts with)
BAD_INPUTS: dict[str, tuple[str, Any, str]] = {
    "hera dataset file missing": ("hera", lambda a, h, t: {"dataset_dir": str(_without_file(a.dataset_dir, t,
                                                                                             "hera_demo")[0])},
                                  "dataset: dataset 'hera_demo' is listed in "),
    "harc role file missing": ("harc", lambda a, h, t: {"dataset_dir": str(_without_file(h.dataset_dir, t,
                                                                                          "harc_pseudo")[0])},
                               "harc_pseudo: dataset 'harc_pseudo' is listed in "),
    "hera on a text-only model": ("hera", lambda a, h, t: {"model_name_or_path": str(h.models["llama3"]),
                                                           "template": "llama3"},
                                  "model_name_or_path: "),
    "hera without template": ("hera", {"template": None}, "template: not set; stage: hera trains on image rows"),
    "hera with a text template": ("hera", {"template": "qwen"}, "template: qwen has no image plugin; stage: hera"),
    "missing deepspeed config": ("hera", {"deepspeed": "/nonexistent/ds_z3_config.json"},
                                 "deepspeed: /nonexistent/ds_z3_config.json is not a file. Point it at"),
    "hera resume from nothing": ("hera", {"resume_from_checkpoint": "/nonexistent/checkpoint-5"},
                                 "resume_from_checkpoint: /nonexistent/checkpoint-5 is not a folder. Name a"),
    "harc resume from nothing": ("harc", {"resume_from_checkpoint": "/nonexistent/checkpoint-5"},
                                 "resume_from_checkpoint: /nonexistent/checkpoint-5 is not a folder. Name a"),
    "harc resume from a plain folder": ("harc", lambda a, h, t: {"resume_from_checkpoint": _checkpointless(t)},
                                        "resume_from_checkpoint: "),
    "fp16 and bf16": ("hera", {"fp16": True, "bf16": True}, "fp16: true and bf16: true: a run trains in one "),
    "rah with packing": ("rah", {"packing": True}, "packing: true is not supported by stage: rah: "),
    # a single rank under ZeRO-3 (one GPU, or FORCE_TORCHRUN=1 NPROC_PER_NODE=1): RAH has no optimizer to shard
    "rah with deepspeed": ("rah", {"deepspeed": str(REPO / "recipes" / "deepspeed" / "ds_z3_config.json")},
                           "stage: rah takes no optimizer step and runs as one process; remove deepspeed."),
    "rah with resume": ("rah", {"resume_from_checkpoint": "/nonexistent/checkpoint-5"},
                        "resume_from_checkpoint: /nonexistent/checkpoint-5 does not apply to stage: rah: "),
    # unchecked: a bare StopIteration while the rows were aligned (HeRA), or a late or no error
    **{f"{stage} max_samples 0": (stage, {"max_samples": 0}, "max_samples: 0 keeps no row of any dataset (") for stage
       in STAGES},
    # unchecked: diagnosed as frozen heads ("add those layers' o_proj to lora_target") once the model had loaded
    "hera do_train false": ("hera", {"do_train": False}, "do_train: false: stage: hera trains (its loss exists only "),
    "hera without do_train": ("hera", {"do_train": None}, "do_train: false: stage: hera trains (its loss exists only "),
    # unchecked: trained (an auto queue of 404 filled with the same 16 images), or with k lowered at every step
    "hera_k above the distinct images": ("hera", {"hera_k": 100, "max_samples": 16},
                                         "hera_k: 100: a contrastive set needs 101 distinct images (hera_k + 1: an "
                                         "anchor and its 100 teacher neighbours; at least 3 for a negative), but the "
                                         "training data (dataset: hera_demo, max_samples: 16) has 16 distinct images"),
    "hera_k above the batch and queue": ("hera", {"hera_k": 10, "per_device_train_batch_size": 4,
                                                  "hera_queue_size": 2},
                                         "hera_k: 10: each contrastive set needs hera_k + 1 = 11 samples"),
    # unchecked: a FileNotFoundError from the preprocessing once the model had loaded
    "rah image files missing": ("rah", lambda a, h, t: {"dataset_dir": str(_without_images(a.dataset_dir, t))},
                                "image 'images/"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_one_line_before_loading(case: str, assets: Any, harc_assets: Any, tmp_path: Path,
                                                no_model_load: None) -> None:
    """Each used to end in a traceback or an unrelated message, several after the weights loaded (the issue's list);
    RAH-LoRA ignored ``resume_from_checkpoint`` silently."""
    stage, overrides, start = BAD_INPUTS[case]
    if callable(overrides):
        overrides = overrides(assets, harc_assets, tmp_path)
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **overrides))
    assert message.startswith(start), message


@pytest.mark.parametrize(("stage", "key"), [("hera", "enable_liger_kernel"), ("harc", "use_liger_kernel")])
def test_liger_kernels_without_liger_kernel_are_one_line_before_loading(stage: str, key: str, assets: Any,
                                                                        harc_assets: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        no_model_load: None) -> None:
    """LLaMA-Factory imports liger_kernel once the model has loaded (``enable_liger_kernel``: its 60-line traceback
    ending in ModuleNotFoundError; transformers' ``use_liger_kernel``: its ImportError in the Trainer). With
    liger_kernel unimportable, as where it is not installed: one line before loading, with the pip command."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    assert _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **{key: True})) == (
        f"{key}: true needs liger-kernel, which is not installed here. Install it: pip install '{LIGER}' (or remove "
        f"{key} to train without it).")


def test_liger_kernel_is_asked_for_whatever_the_model_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's parse requires liger-kernel for ``enable_liger_kernel`` on any model (hparams/parser.py
    ``check_version("liger-kernel", mandatory=True)``), also a type its patch list leaves alone: a Qwen3-VL without it
    ended in a 60-line PackageNotFoundError; now one line for a Qwen2.5-VL, a Qwen3-VL and a hub id alike."""
    from llamafactory_hera.recipe.raw_checks import check_engines_installed

    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    for model_type in ("qwen2_5_vl", "qwen3_vl"):
        model = tmp_path / model_type
        model.mkdir()
        (model / "config.json").write_text(f'{{"model_type": "{model_type}"}}', encoding="utf-8")
        with pytest.raises(RecipeError, match=r"^enable_liger_kernel: true needs liger-kernel, .*pip install "
                           r"'liger-kernel>=0\.5\.5' \(or remove enable_liger_kernel to train without it\)\.$"):
            check_engines_installed({"model_name_or_path": str(model), "enable_liger_kernel": True}, "hera")
    with pytest.raises(RecipeError, match="enable_liger_kernel: true needs liger-kernel"):
        check_engines_installed({"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "enable_liger_kernel": True},
                                "hera")


MULTI_NODE = [({"NNODES": "2"}, "NNODES=2"),  # llamafactory-cli train on each node, as LLaMA-Factory's docs say
              ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, "WORLD_SIZE=2 over LOCAL_WORLD_SIZE=1")]  # a rank


@pytest.mark.parametrize(("env", "named"), MULTI_NODE)
def test_rah_and_select_over_several_nodes_are_one_line_before_loading(env: dict[str, str], named: str, assets: Any,
                                                                        tmp_path: Path, capfd: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        no_model_load: None) -> None:
    """Each node ran RAH-LoRA's calibration or select's scoring whole (select: both nodes scored every head, one wrote
    the recipe, the other failed with "Pass --force"; RAH-LoRA's refusal of several processes advised the very
    command each node had run): now one line naming the launch, before anything loads."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _refused(_recipe("rah", assets, None, tmp_path / "out")) == (
        f"{named}: stage: rah runs as one process on one node (its model over that node's GPUs); launched on several "
        "nodes, each would calibrate the whole model into the same output_dir. Run it on one node (NNODES unset or 1, "
        "one srun task).")
    proc = run_verb(capfd, "select", tmp_path / "recipe.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"llamafactory-hera: error: {named}: llamafactory-hera select runs as one process on one node; launched on "
        "several nodes, each would score every head and write the recipe. Run it once, on one node.\n")


def test_a_deepspeed_config_given_inline_is_not_refused() -> None:
    import base64

    from llamafactory_hera.recipe.raw_checks import check_precision_and_deepspeed

    text = '{"zero_optimization": {"stage": 2}}'
    for value in (text, base64.b64encode(text.encode()).decode(), "recipes/deepspeed/ds_z2_config.json"):
        check_precision_and_deepspeed({"deepspeed": value})


def test_rah_on_several_ranks_names_the_one_process_way() -> None:
    """Several processes (torchrun, accelerate launch, FORCE_TORCHRUN): the refusal names the one-process way over
    every GPU."""
    from types import SimpleNamespace

    from llamafactory_hera.rah.config import RahArguments
    from llamafactory_hera.rah.parsed_checks import validate_host_args

    with pytest.raises(ValueError) as error:
        validate_host_args(SimpleNamespace(), SimpleNamespace(), SimpleNamespace(world_size=8), SimpleNamespace(),
                           SimpleNamespace(), RahArguments())
    assert str(error.value).startswith("8 processes: stage: rah runs as one process that places the model over "
                                       "every visible GPU; run it so: llamafactory-cli train RECIPE with "
                                       "FORCE_TORCHRUN unset")


@pytest.mark.parametrize("name", ["sigusr1", "sigterm", "none"])
def test_the_launching_process_leaves_the_schedulers_signals_to_the_ranks(assets: Any, tmp_path: Path,
                                                                          name: str) -> None:
    """The check that runs in ``llamafactory-cli``'s (or ``accelerate launch``'s) process before the ranks start sets
    the scheduler's warning signals (SIGUSR1, SIGUSR2) to ignored there, which torchrun's agent inherits: a scheduler's
    signal to every process of the job would otherwise end the agent and the launcher while the ranks save (the
    save signal), or end the whole job with no line (the other one, which the ranks take for the save signal with a
    line). SIGTERM stays theirs; ``none`` leaves every signal as it was."""
    import signal

    from llamafactory_hera_patches.launch import check_before_ranks

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base_recipe(assets, "qwen2_5_vl", tmp_path / "out") | {"hera_save_on_signal": name}))
    numbers = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    before = {number: signal.getsignal(number) for number in numbers}
    try:
        for number in numbers[:2]:  # as a launcher starts: another test's check in this worker may leave them ignored
            signal.signal(number, signal.SIG_DFL)
        assert check_before_ranks(["llamafactory-cli", "train", str(path)]).stage == "hera"
        ignored = [number for number in numbers if signal.getsignal(number) == signal.SIG_IGN]
        assert ignored == ([] if name == "none" else [signal.SIGUSR1, signal.SIGUSR2])
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@pytest.mark.parametrize(("plugin_stage", "restarts", "ran"), [
    (False, "1", True),  # stock sft, the switch set to 0 by hand: the host's run, as without the plugin
    (True, "0", True),  # a plugin stage that never restarts: torch's default is no hazard
    (True, "1", False),  # a plugin stage that restarts: one line before the ranks start
])
def test_the_store_switch_set_by_hand_is_refused_only_for_a_plugin_stage_that_restarts(
        plugin_stage: bool, restarts: str, ran: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``llamafactory-cli train`` under an elastic torchrun (patches/.../launch.py, the recipe's check and torchrun
    stood in): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 set by hand is kept, and refused only where it can harm."""
    import contextlib
    import os
    from types import SimpleNamespace

    from llamafactory_hera.runtime import elastic
    from llamafactory_hera_patches import launch

    run = SimpleNamespace(method=SimpleNamespace(one_process=False)) if plugin_stage else None
    monkeypatch.setattr(launch, "starts_torchrun", lambda argv: True)
    monkeypatch.setattr(launch, "check_before_ranks", lambda argv: run)
    monkeypatch.setattr(launch.launch_watch, "watching", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(launch.launch_watch, "check_master_address", lambda: None)
    monkeypatch.setattr(launch.launch_signals, "launching", contextlib.nullcontext)
    monkeypatch.setenv("RDZV_ID", "job")
    monkeypatch.setenv("MAX_RESTARTS", restarts)
    monkeypatch.setenv(elastic.SWITCH, "0")
    started: list[str] = []

    def torchrun() -> None:
        started.append(os.environ[elastic.SWITCH])

    if ran:
        launch.launch(torchrun)
        assert started == ["0"]
        return
    with pytest.raises(RecipeError, match=f"^{elastic.SWITCH}=0 with RDZV_ID=job: "):
        launch.launch(torchrun)
    assert started == []
