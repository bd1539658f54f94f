"""recipe/quantization.py: which quantizations the stages take (bitsandbytes 4/8-bit) and which they refuse by name,
from the recipe and from a checkpoint's quantization_config; DoRA with quantization (HeRA and HARC); a QLoRA recipe
where bitsandbytes is not installed (recipe/raw_checks.py)."""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from test_accelerate_refusals import output_lines
from transformers import BitsAndBytesConfig

from conftest import ENGINES, EVAL_ONLY, REPO, base_recipe, run_train
from llamafactory_hera.recipe.quantization import check_quantization
from llamafactory_hera.recipe.raw_checks import QLORA
from llamafactory_hera.runtime.errors import RecipeError


def _args(bits: int | None = None, method: str = "bnb") -> SimpleNamespace:
    return SimpleNamespace(model_name_or_path="/m", quantization_bit=bits, quantization_method=method)


def _config(quantization: object = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quantization)


def test_bitsandbytes_is_read_from_the_recipe_and_from_the_checkpoint() -> None:
    assert check_quantization(_args(), _config(), "hera", "W_O") is None
    assert check_quantization(_args(4), _config(), "hera", "W_O") == ("bitsandbytes", 4)
    assert check_quantization(_args(8), _config(), "hera", "W_O") == ("bitsandbytes", 8)
    saved = BitsAndBytesConfig(load_in_8bit=True)  # the object form, and the dict form config.json gives
    assert check_quantization(_args(), _config(saved), "hera", "W_O") == ("bitsandbytes", 8)
    assert check_quantization(_args(4), _config({"quant_method": "bitsandbytes", "load_in_4bit": True}),
                                       "hera", "W_O") == ("bitsandbytes", 4)  # the checkpoint's wins


def test_bitsandbytes_at_another_width_is_refused() -> None:
    with pytest.raises(RecipeError, match="quantization_bit: 2 with quantization_method: bnb cannot be read exactly: "
                                          "bitsandbytes quantizes to 4 or 8 bits only"):
        check_quantization(_args(2), _config(), "hera", "W_O")


@pytest.mark.parametrize("method", ["hqq", "eetq", "gptq", "quanto"])
def test_another_method_in_the_recipe_is_refused_by_name(method: str) -> None:
    with pytest.raises(RecipeError, match=f"stage: hera reads W_O, and quantization_bit: 4 with quantization_method: "
                                          f"{method} cannot be read exactly: {method} stores packed codes"):
        check_quantization(_args(4, method), _config(), "hera", "W_O")


@pytest.mark.parametrize("method", ["gptq", "awq", "aqlm", "hqq", "eetq", "fp8", "mxfp4", "compressed-tensors"])
def test_a_checkpoint_saved_in_another_method_is_refused_by_name_even_with_bitsandbytes_bits(method: str) -> None:
    with pytest.raises(RecipeError, match=f"model_name_or_path: /m \\(saved {method}-quantized"):
        check_quantization(_args(4), _config({"quant_method": method, "bits": 4}), "rah", "V and O")


@pytest.mark.parametrize("stage", ["hera", "harc"])
def test_hera_refuses_dora_with_quantization(stage: str) -> None:
    """HeRA, and HARC with the same check (HARC used to load the 4-bit model, then end in LLaMA-Factory's "DoRA is not
    compatible with PTQ-quantized models", 256 lines)."""
    reads = "W_O" if stage == "hera" else None
    assert check_quantization(_args(4), _config(), stage, reads, dora=False) == ("bitsandbytes", 4)
    assert check_quantization(_args(), _config(), stage, reads, dora=True) is None
    for bits in (4, 8):
        with pytest.raises(RecipeError, match=f"use_dora: true with {bits}-bit bitsandbytes weights: LLaMA-Factory"):
            check_quantization(_args(bits), _config(), stage, reads, dora=True)


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "fp8"])
def test_harc_refuses_an_untested_quantization_by_name(method: str) -> None:
    """HARC on a GPTQ / HQQ checkpoint was LLaMA-Factory's traceback naming a package to install (266 lines)."""
    with pytest.raises(RecipeError, match=f"^stage: harc is not run on model_name_or_path: /m \\(saved {method}-"
                                          f"quantized.*: llamafactory-hera runs stage: harc on bitsandbytes 4-/8-bit "
                                          f"weights only \\(no test loads {method} weights\\)"):
        check_quantization(_args(), _config({"quant_method": method, "bits": 4}), "harc")
    with pytest.raises(RecipeError, match="^stage: harc is not run on quantization_bit: 4 with quantization_method: "
                                          "hqq"):
        check_quantization(_args(4, "hqq"), _config(), "harc")


@pytest.mark.usefixtures("no_model_load")
def test_harc_quantization_refusals_come_before_loading(harc_assets: Any, tmp_path: Path) -> None:
    """Through LLaMA-Factory's run_exp: DoRA with 4-bit weights, and a checkpoint saved GPTQ-quantized."""
    from test_launch_refusals import _refused

    from conftest import harc_recipe

    message = _refused(harc_recipe(harc_assets, "llama3", tmp_path / "out", quantization_bit=4, use_dora=True))
    assert message.startswith("use_dora: true with 4-bit bitsandbytes weights: LLaMA-Factory 0.9.5 refuses"), message
    folder = tmp_path / "gptq"
    shutil.copytree(harc_assets.models["llama3"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                      "bits": 4}}), encoding="utf-8")
    message = _refused(harc_recipe(harc_assets, "llama3", tmp_path / "out", model_name_or_path=str(folder)))
    assert message.startswith(f"stage: harc is not run on model_name_or_path: {folder} (saved gptq-quantized"), message


def test_the_qlora_extra_is_the_bitsandbytes_the_refusal_names() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["qlora"] == [QLORA]


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("stage", ["harc", "rah"])
def test_quantization_without_bitsandbytes_is_one_line(stage: str, assets: Any, harc_assets: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bitsandbytes (``find_spec`` patched), before loading: HARC and RAH-LoRA name the pip command, after the
    values no install makes run (``quantization_bit: 3`` asked for bitsandbytes, which would then refuse 3 bits).
    (HeRA through the real CLI below.)"""
    import importlib.util

    from test_launch_refusals import _recipe, _refused

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "bitsandbytes" else find_spec(name, *rest))
    # DoRA with quantization is refused whatever is installed: said before asking for it
    dora = _refused(_recipe(stage, assets, harc_assets, tmp_path / "dora", quantization_bit=4, use_dora=True))
    assert dora.startswith("use_dora: true with 4-bit bitsandbytes weights: LLaMA-Factory 0.9.5 refuses"), dora
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", quantization_bit=4))
    assert message == (f"quantization_bit: 4 needs bitsandbytes, which is not installed here. Install it: pip install "
                       f"'{QLORA}' (llamafactory-hera's qlora extra: pip install '.[qlora]' in its clone; or remove "
                       "quantization_bit to train unquantized)."), message
    # a value no install makes run is said first, then the install: quantization_type's, quantization_bit's own
    assert _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", quantization_bit=4,
                            quantization_type="nf5")).startswith("quantization_type: nf5 is not a value")
    assert _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", quantization_bit=3)) == (
        "quantization_bit: 3: bitsandbytes (quantization_method: bnb, the default) quantizes to 4 or 8 bits only. Set "
        "quantization_bit: 4 or 8, or remove it to train unquantized.")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", quantization_type="nf5")).startswith(
        "quantization_type: nf5 is not a value"), "the other key's error is one"


def test_the_qlora_recipe_without_bitsandbytes_is_one_line_before_loading(assets: Any, tmp_path: Path) -> None:
    """recipes/qwen3_8b_hera_qlora.yaml on a tiny model through the real ``llamafactory-cli train``, bitsandbytes
    hidden (tests/process_hooks/hidden_modules.py: no module, no metadata): before, 655 lines ending in LLaMA-Factory's
    version check's "To fix: run `pip install bitsandbytes>=0.39.0`" after loading the tokenizer and the data (with
    HeRA's head selection: its PackageNotFoundError). Now the refusal alone, with the pip command."""
    qlora = yaml.safe_load((REPO / "recipes" / "qwen3_8b_hera_qlora.yaml").read_text(encoding="utf-8"))
    tiny = base_recipe(assets, "qwen2_5_vl", tmp_path / "out")
    recipe = {**qlora, **{k: v for k, v in tiny.items() if k.startswith("hera_teacher") or not k.startswith("hera_")},
              "hera_select_num_heads": 2, "hera_select_samples": 8, "hera_k": 2, "bf16": False,
              "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "trust_remote_code": False}
    hidden = ",".join([*EVAL_ONLY, *ENGINES])
    proc = run_train(recipe, tmp_path, check=False, process=True, env={"HERA_TESTS_HIDDEN": hidden})
    lines = output_lines(proc)
    assert proc.returncode == 1 and len(lines) <= 2 and "Traceback" not in proc.stderr, "\n".join(lines)
    assert lines[-1].startswith("[llamafactory-hera] error: quantization_bit: 4 needs bitsandbytes, which is not "
                                f"installed here. Install it: pip install '{QLORA}'"), "\n".join(lines)


# what bitsandbytes' CPU backend logs at its import on a CPU with AVX512-BF16 where the `kernels` package is missing
KERNEL_NOTE = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
               "sure you already `pip install kernels` and the kernels >= 0.11.1")


@pytest.mark.parametrize("quantized", [False, True])
def test_bitsandbytes_cpu_kernel_note_only_where_a_run_quantizes(quantized: bool, assets, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """After ``pip install ".[qlora]"`` every run printed that note, quantized or not: PEFT imports bitsandbytes in
    every LoRA run where it is installed. A stock sft run through ``run_exp`` whose workflow imports bitsandbytes
    afresh (its note logged as bitsandbytes logs it, where the first import in a process would): said only with
    ``quantization_bit: 4``."""
    import logging

    from llamafactory.train import tuner

    def workflow(*args: Any, **kwargs: Any) -> None:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
            "install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))

    monkeypatch.setattr(tuner, "run_sft", workflow)
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # not yet imported by this process
    recipe = {key: value for key, value in base_recipe(assets, "qwen2_5_vl", tmp_path / "out").items()
              if not key.startswith("hera_")} | {"stage": "sft", "quantization_bit": 4 if quantized else None}
    tuner.run_exp({key: value for key, value in recipe.items() if value is not None})
    seen = caplog.text + capsys.readouterr().err
    assert (KERNEL_NOTE in seen) is quantized, seen[-2000:]
