"""The host stacks: a transformers outside what LLaMA-Factory 0.9.5 or main allows is refused at start-up
in one line; a family the installed transformers lacks and ``flash_attn: fa2`` on transformers 5.6.0 are refused by
name before loading, through LLaMA-Factory's real ``run_exp``; the families table (patches' stacks.py, and
docs/families.md) agrees with the installed transformers' own registry."""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import transformers
from packaging.version import Version
from test_launch_refusals import _recipe, _refused
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from conftest import REPO
from llamafactory_hera import _bootstrap
from llamafactory_hera.recipe import stack_checks
from llamafactory_hera.runtime.log import say_again_on_board
from llamafactory_hera_patches import stacks

FOUND = transformers.__version__


@pytest.mark.parametrize(("found", "refused"), [
    ("4.54.1", True), ("4.55.0", False), ("4.57.0", True), ("4.57.1", False), ("5.6.0", False), ("5.8.0", False),
    ("5.8.1", False), ("5.9.0", True), (FOUND, False),
    # as versions, pre- and dev releases as LLaMA-Factory's own check (packaging) orders them
    ("4.55.0rc1", True), ("4.57.0.dev0", False), ("5.8.0.dev0", False), ("5.8.0rc1", False), ("5.9.0rc1", True),
    ("5.9.0.dev0", True), ("5.10.0", True),
])
def test_a_transformers_release_outside_the_supported_range_is_one_line(found: str, refused: bool) -> None:
    message = stacks.unsupported_transformers(found)
    assert (message is not None) == refused, message
    if refused:
        assert "\n" not in message and f"transformers {found} is not supported" in message
        assert f"supported: {stacks.TRANSFORMERS_SUPPORTED}" in message
        assert message.endswith(f"pip install 'transformers{stacks.TRANSFORMERS_SUPPORTED}'")


@pytest.mark.parametrize("model_type", sorted(stacks.FAMILY_MIN_TRANSFORMERS))
def test_a_family_at_its_own_first_release_is_not_refused(model_type: str) -> None:
    """At the exact release (and its pre- and dev releases) a family is not refused; one release before, it is."""
    needed = stacks.FAMILY_MIN_TRANSFORMERS[model_type]
    major, minor, patch = Version(needed).release
    before = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.99" if minor else f"{major - 1}.99.0"
    for found in (needed, f"{needed}rc1", f"{needed}.dev0", f"{major}.{minor}.{patch + 1}", f"{major}.{minor + 10}.0"):
        assert stacks.family_too_new(model_type, found) is None, found
    for found in (before, f"{before}.dev0", f"{major}.{minor}" if patch else before):
        assert stacks.family_too_new(model_type, found) == needed, found


def test_the_pyproject_declares_the_supported_range() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert f"transformers{stacks.TRANSFORMERS_SUPPORTED}" in project["dependencies"]


def test_start_up_refuses_an_unsupported_transformers_before_patching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stacks, "installed", lambda distribution="transformers": "4.54.1")
    applied: list[str] = []
    fake_patch = types.SimpleNamespace(apply=applied.append)
    monkeypatch.setitem(__import__("sys").modules, "llamafactory_hera_patches.fake", fake_patch)
    with pytest.raises(SystemExit) as stop:
        _bootstrap._apply("fake", "module")
    assert str(stop.value.code).startswith("llamafactory-hera: transformers 4.54.1 is not supported")
    assert applied == []  # nothing patched
    monkeypatch.setattr(stacks, "installed", lambda distribution="transformers": FOUND)
    _bootstrap._apply("fake", "module")
    assert applied == ["module"]


def test_the_families_table_agrees_with_the_installed_transformers() -> None:
    """A family is in the installed transformers' registry exactly when the table says its release is here (read
    from the host, not counted)."""
    for model_type, needed in stacks.FAMILY_MIN_TRANSFORMERS.items():
        here = model_type in CONFIG_MAPPING_NAMES
        assert here == (Version(FOUND) >= Version(needed)), (model_type, needed, FOUND)


def test_docs_mark_each_family_that_needs_a_newer_transformers() -> None:
    docs = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    for model_type, needed in stacks.FAMILY_MIN_TRANSFORMERS.items():
        if model_type == "dinov3_vit":
            continue  # a teacher, not an MLLM family: docs/hera.md
        row = next((line for line in docs.splitlines() if re.match(rf"\| {model_type}\b", line)), None)
        assert row is not None and f"transformers >= {needed}" in row, (model_type, row)


def _family_folder(assets: Any, model_type: str, folder: Path) -> str:
    """A model folder whose config names ``model_type`` (the check reads config.json only)."""
    shutil.copytree(assets.models["qwen2_5_vl"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}), encoding="utf-8")
    return str(folder)


@pytest.mark.usefixtures("no_model_load")
def test_a_family_the_installed_transformers_lacks_is_refused_by_name(assets: Any, harc_assets: Any,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    newer = [t for t, v in stacks.FAMILY_MIN_TRANSFORMERS.items() if Version(v) > Version(FOUND)]
    if newer:  # the installed release lacks a family: the real one
        model_type, found = newer[0], FOUND
    else:  # it has them all: as on transformers 5.4
        model_type, found = "gemma4", "5.4.0"
        monkeypatch.setattr(stack_checks, "installed", lambda: found)
    model = _family_folder(assets, model_type, tmp_path / "model")
    needed = stacks.FAMILY_MIN_TRANSFORMERS[model_type]
    message = _refused(_recipe("hera", assets, harc_assets, tmp_path / "out", model_name_or_path=model))
    assert message.startswith(f"model_name_or_path: {model} is a {model_type} model, which transformers {found} does "
                              f"not have (its class came in transformers {needed}; docs/families.md)"), message
    assert f"pip install 'transformers>={needed}'" in message


# the image-text families LLaMA-Factory 0.9.5 registers (model_utils.visual.COMPOSITE_MODELS), each a row of
# docs/families.md or among its remote-code families
FAMILIES_0_9_5 = {
    "Keye", "dots_ocr", "gemma3", "gemma3n", "gemma4", "glm4v", "glm4v_moe", "glm_ocr", "interns1", "internvl",
    "kimi_vl", "llama4", "llava", "llava_next", "llava_next_video", "minicpmo", "minicpmv", "minicpmv4_6", "mistral3",
    "mllama", "paligemma", "qwen2_5_omni_thinker", "qwen2_5_vl", "qwen2_audio", "qwen2_vl", "qwen3_5", "qwen3_5_moe",
    "qwen3_omni_moe_thinker", "qwen3_vl", "qwen3_vl_moe", "video_llava"}


def test_every_image_text_family_llamafactory_adds_is_run_or_refused() -> None:
    """A family the installed LLaMA-Factory registers beyond 0.9.5's (main: MOSS-VL) is refused by name, and the docs
    say so, until a test runs HeRA and RAH-LoRA on it (then a row of docs/families.md and of this test's set)."""
    from llamafactory.model.model_utils.visual import COMPOSITE_MODELS

    added = set(COMPOSITE_MODELS) - FAMILIES_0_9_5
    assert added <= set(stacks.FAMILY_REFUSED), added
    docs = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    for model_type in stacks.FAMILY_REFUSED:
        assert f"`{model_type}` is refused by name" in docs, model_type


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("stage", ["hera", "rah"])
def test_moss_vl_is_refused_by_name_before_loading(stage: str, assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    """MOSS-VL (LLaMA-Factory main, the model's own code on transformers 4.57.1 only): one line naming it, on any
    stack (the check reads config.json's model_type)."""
    model = _family_folder(assets, "moss_vl", tmp_path / "model")
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", model_name_or_path=model))
    assert message == (f"model_name_or_path: {model} is a moss_vl model, which llamafactory-hera's stages do not run "
                       f"on: {stacks.FAMILY_REFUSED['moss_vl']}. Train it with stage: sft, or choose a family of "
                       "docs/families.md."), message


@pytest.mark.usefixtures("no_model_load")
def test_fa2_on_transformers_5_6_0_is_refused_before_loading(assets: Any, harc_assets: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory issue 10610: transformers 5.6.0's flash-attention 2 fails (s_aux None); main excludes 5.6.0."""
    monkeypatch.setattr(stack_checks, "installed", lambda: "5.6.0")
    message = _refused(_recipe("harc", assets, harc_assets, tmp_path / "out", flash_attn="fa2"))
    assert message.startswith("flash_attn: fa2 on transformers 5.6.0: ") and "10610" in message, message
    assert "flash_attn: sdpa" in message and "transformers >= 5.7 with LLaMA-Factory main" in message
    for found, attention in (("5.7.0", "fa2"), ("5.6.0", "sdpa"), ("5.6.0", "auto")):
        monkeypatch.setattr(stack_checks, "installed", lambda found=found: found)
        stack_checks.check_stack({"flash_attn": attention})


def test_8_bit_on_transformers_5_8_0_is_warned_of_once_before_loading(capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """Measured on LLaMA-Factory main: stock SFT's 8-bit LoRA gradients against the dequantized twin's, 77 % apart on
    5.8.0, 2e-7 on 5.7.0 (CPU only: warned of, not refused). Once per launch: the launcher's line, none on the ranks
    it starts nor on srun's other tasks; again in LlamaBoard's log box once the run's callbacks exist."""
    for key in ("LLAMAFACTORY_HERA_HOST_WARNED", "RANK", "SLURM_PROCID", "LLAMABOARD_ENABLED"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown restores the session's values
        monkeypatch.delenv(key)
    monkeypatch.setattr(stack_checks, "installed", lambda: "5.8.0")
    stack_checks.check_stack({"quantization_bit": 8})
    stack_checks.check_stack({"quantization_bit": "8"})
    out = capsys.readouterr().out.splitlines()
    assert out == ["[llamafactory-hera] warning: quantization_bit: 8 on transformers 5.8.0: stock SFT's first-step "
                   "LoRA gradients through LLaMA-Factory's 8-bit model differed from the dequantized model's by up to "
                   "77 % (one tensor's norm; tiny Llama-3, LLaMA-Factory main, measured on the CPU only, a GPU's "
                   "kernels not checked, 2026-11-26), 2e-7 on transformers 5.7.0. Use quantization_bit: 4, or pip "
                   "install 'transformers==5.7.0'."]
    saved = tmp_path / "saved_8bit"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes",
                                                                           "load_in_8bit": True}}))
    monkeypatch.delenv("LLAMAFACTORY_HERA_HOST_WARNED")
    stack_checks.check_stack({"model_name_or_path": str(saved)})
    assert capsys.readouterr().out.startswith("[llamafactory-hera] warning: the model saved 8-bit on "
                                              "transformers 5.8.0: stock SFT's")
    monkeypatch.delenv("LLAMAFACTORY_HERA_HOST_WARNED")
    for key, value in (("RANK", "1"), ("SLURM_PROCID", "3")):  # another rank of torchrun, another task of srun
        monkeypatch.setenv(key, value)
        stack_checks.check_stack({"quantization_bit": 8})
        monkeypatch.delenv(key)
    for found, given in (("5.7.0", {"quantization_bit": 8}), ("5.8.0", {"quantization_bit": 4}),
                         ("5.6.0", {"quantization_bit": 8}), ("5.8.0", {"quantization_bit": 8,
                                                                        "quantization_method": "hqq"})):
        monkeypatch.setattr(stack_checks, "installed", lambda found=found: found)
        stack_checks.check_stack(given)
    assert capsys.readouterr().out == ""
    # LlamaBoard: LLaMA-Factory's LogCallback empties running_log.txt after the checks; the run says it again there
    monkeypatch.setattr(stack_checks, "installed", lambda: "5.8.0")
    monkeypatch.setenv("LLAMABOARD_ENABLED", "1")
    monkeypatch.setenv("LLAMABOARD_WORKDIR", str(tmp_path / "board"))
    monkeypatch.setenv("LLAMAFACTORY_HERA_SAY_AGAIN", "")
    monkeypatch.delenv("LLAMAFACTORY_HERA_SAY_AGAIN")
    stack_checks.check_stack({"quantization_bit": 8})
    (tmp_path / "board" / "running_log.txt").unlink()  # what LLaMA-Factory's LoggerHandler does when it starts
    say_again_on_board()
    assert (tmp_path / "board" / "running_log.txt").read_text().startswith(
        "[llamafactory-hera] warning: quantization_bit: 8 on transformers 5.8.0")
    say_again_on_board()  # said once
    assert (tmp_path / "board" / "running_log.txt").read_text().count("warning") == 1


def test_newer_classes_are_stand_ins_that_name_themselves_on_an_older_transformers() -> None:
    from llamafactory_hera.fixtures.newer import newer

    assert newer("LlavaConfig") is transformers.LlavaConfig
    assert newer("NoSuchProcessor", "LlavaProcessor") is transformers.LlavaProcessor  # the fallback
    stand_in = newer("NoSuchConfig")
    with pytest.raises(ImportError, match=rf"transformers {re.escape(FOUND)} has no NoSuchConfig"):
        stand_in(hidden_size=8)


def test_a_fixture_tokenizer_becomes_the_class_a_transformers_4_processor_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafactory_hera.fixtures import tokenizer as fixture_tokenizer
    from llamafactory_hera.fixtures.tokenizer import QWEN2_VL_CHAT_TEMPLATE, build_qwen_tokenizer, for_processor

    tok = build_qwen_tokenizer(QWEN2_VL_CHAT_TEMPLATE)
    strict = type("StrictProcessor", (), {"tokenizer_class": ("Qwen2Tokenizer", "Qwen2TokenizerFast")})
    assert for_processor(tok, strict) is tok or Version(FOUND).major < 5  # transformers 5 takes any fast tokenizer
    # the transformers module the fixtures read (a test before this one in the same process may have put another
    # transformers module object into sys.modules than the one this file imported)
    host = fixture_tokenizer.transformers
    monkeypatch.setattr(host, "__version__", "4.55.4")
    converted = for_processor(tok, strict)
    assert type(converted) is host.Qwen2TokenizerFast and converted.get_vocab() == tok.get_vocab()
    text = "<|im_start|>user hello<|im_end|>"
    assert converted(text)["input_ids"] == tok(text)["input_ids"]
    assert (converted.eos_token, converted.pad_token) == (tok.eos_token, tok.pad_token)
    assert for_processor(tok, type("AnyProcessor", (), {"tokenizer_class": "AutoTokenizer"})) is tok


@pytest.mark.parametrize(("device", "placed"), [("cpu", "cpu"), ("cpu:0", "cpu"), ("cpu:1", "cpu"),
                                               ("cuda:3", "cuda:3"), ("cuda", "cuda"), ("mps", "mps"),
                                               ("npu:0", "npu:0"), ("xpu:0", "xpu:0")])
def test_a_scoring_model_on_a_cpu_rank_loads_on_the_plain_cpu(device: str, placed: str) -> None:
    """transformers 4.55 refuses ``device_map {"": "cpu:0"}`` (a CPU rank's training_args.device) in its safetensors
    loading: ``hera_heads: auto`` under torchrun failed there; an accelerator keeps its index."""
    from llamafactory_hera_patches.tools.model_data import scoring_device_map

    assert scoring_device_map(device) == {"": placed}
