"""Recipe mistakes in the keys LLaMA-Factory reads, on a plugin stage (``recipe/host_keys.py``,
``recipe/model_paths.py``, ``recipe/model_checks.py``): each used to end in LLaMA-Factory's or its libraries'
traceback, several only after the model loaded (or in a run that trained less than the recipe said); each is now one
line naming the key, the value, why and the fix, before anything loads, through LLaMA-Factory's real ``run_exp``
(``no_model_load`` fails the test if the model loads first) and, where the output's length is what is tested, through
``llamafactory-cli train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_launch_refusals import _recipe, _refused, _without_images
from transformers.training_args import OptimizerNames

from conftest import REPO, run_train
from llamafactory_hera.recipe.host_keys import check_bf16_device, check_choices, check_host_keys
from llamafactory_hera.recipe.model_checks import check_lora_target
from llamafactory_hera.recipe.model_paths import check_model_paths
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy
from llamafactory_hera_patches.recipe.arguments import split_args


def _model_folder(assets: Any, harc_assets: Any, tmp_path: Path) -> dict[str, str]:
    return {"model_name_or_path": str(harc_assets.models["llama3"]) + "x"}


# (stage, overrides or a function of (assets, harc_assets, tmp_path) giving them, what the message starts with: a
# function of the same three and the recipe, or a string); what each ended with before, in the comment
CASES: dict[str, tuple[str, Any, Any]] = {
    # ValueError: Template qwen2_vll does not exist. (after the tokenizer loaded)
    "unknown template": ("hera", {"template": "qwen2_vll"},
                         "template: qwen2_vll is not a chat template of LLaMA-Factory (the nearest: qwen2_vl, "),
    # AssertionError: Invalid fine-tuning method.
    "misspelt finetuning_type": ("hera", {"finetuning_type": "lorra"},
                                 "finetuning_type: lorra is not a fine-tuning method (lora, oft, freeze, full); did "
                                 "you mean lora? Set finetuning_type to one of those."),
    # ValueError: 'cosin' is not a valid SchedulerType
    "misspelt lr_scheduler_type": ("harc", {"lr_scheduler_type": "cosin"},
                                   "lr_scheduler_type: cosin is not a value TrainingArguments accepts (linear, "),
    # ValueError: 'adamw_torchh' is not a valid OptimizerNames
    "misspelt optim": ("hera", {"optim": "adamw_torchh"},
                       f"optim: adamw_torchh is not a value TrainingArguments accepts ({len(OptimizerNames)} values, "
                       "among them "),  # counted from the installed transformers (5.6: 42, 5.8: 41)
    # ValueError: Some keys are not used by the HfArgumentParser: ['learning_rat']
    "misspelt stock key": ("harc", {"learning_rat": 1e-4},
                           "learning_rat: 0.0001 (did you mean learning_rate?): not a recipe key of LLaMA-Factory "
                           "or of llamafactory-hera (LLaMA-Factory would stop on it). Correct the spelling, or "
                           "remove it."),
    "a method key without its prefix": ("rah", {"rah_samples": None, "samples": 8},
                                        "samples: 8 (did you mean rah_samples?): not a recipe key "),
    # OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '...llama3x'
    "model path with a typo": ("harc", _model_folder,
                               lambda a, h, t, r: f"model_name_or_path: {r['model_name_or_path']} is not a folder and "
                                                  "not a Hugging Face model id (organisation/name); "
                                                  f"{h.models['llama3'].parent} has llama3. Correct the path"),
    "relative model path with a typo": ("rah", {"model_name_or_path": "./models/qwen_typo"},
                                        "model_name_or_path: ./models/qwen_typo is not a folder (relative to the "
                                        "folder the run starts in, "),
    "model folder without config.json": ("hera", lambda a, h, t: {"model_name_or_path": str(t)},
                                         lambda a, h, t, r: f"model_name_or_path: {t} is a folder without config.json"),
    # select's own check and the stages' refuse it alike (the stages' once let it through to transformers)
    "model path that is a file": ("rah", lambda a, h, t: {"model_name_or_path": str(a.models["qwen2_5_vl"] /
                                                                                    "config.json")},
                                  lambda a, h, t, r: f"model_name_or_path: {r['model_name_or_path']} is a file, not a "
                                                     "folder"),
    "adapter path that does not exist": ("harc", {"adapter_name_or_path": "/nonexistent/adapter"},
                                         "adapter_name_or_path: /nonexistent/adapter is not a folder and not a "),
    # a run that trained v_proj only, exit 0
    "lora_target with a name of no module": ("harc", {"lora_target": "q_projj,v_proj"},
                                             lambda a, h, t, r: f"lora_target: q_projj,v_proj: q_projj names no "
                                                                f"module of {h.models['llama3']} (llama); did you "
                                                                "mean q_proj for q_projj? its linear modules: "
                                                                "down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                                                "up_proj, v_proj. Set lora_target to some of those, "
                                                                "comma-separated, or all."),
    # PEFT's "No `target_modules` passed but also no `target_parameters` found", after the model loaded
    "lora_target of a multimodal model naming no module": ("hera", {"lora_target": "query"},
                                                           "lora_target: query: query names no module of "),
    # a traceback at the first step, after the model loaded (921 lines)
    "cutoff_len 0": ("hera", {"cutoff_len": 0}, "cutoff_len: 0 is out of range: it is the longest tokenized row, in "
                                                "tokens, allowed >= 1. Set cutoff_len >= 1."),
    # ValueError: Invalid learning rate: -0.0001 (after the model loaded)
    "negative learning_rate": ("hera", {"learning_rate": -1e-4}, "learning_rate: -0.0001 is out of range: "),
    # ValueError: batch_size should be a positive integer value (after the model loaded)
    "batch size 0": ("hera", {"per_device_train_batch_size": 0}, "per_device_train_batch_size: 0 is out of range"),
    # ZeroDivisionError (after the model loaded)
    "gradient_accumulation_steps 0": ("harc", {"gradient_accumulation_steps": 0},
                                      "gradient_accumulation_steps: 0 is out of range: it is batches per optimizer "),
    "lora_rank 0": ("rah", {"lora_rank": 0}, "lora_rank: 0 is out of range"),
    "no epoch and no max_steps": ("harc", {"num_train_epochs": 0, "max_steps": None},
                                  "num_train_epochs: 0 trains no step (max_steps not set above 0)."),
    # ValueError: dropout probability has to be between 0 and 1, but got 1.5 (after the model loaded)
    "lora_dropout above 1": ("rah", {"lora_dropout": 1.5}, "lora_dropout: 1.5 is out of range: it is the probability "),
    # trained, exit 0
    "warmup_ratio above 1": ("harc", {"warmup_ratio": 2}, "warmup_ratio: 2 is out of range: "),
    # ValueError: logging strategy IntervalStrategy.STEPS requires non-zero --logging_steps
    "logging_steps 0": ("hera", {"logging_steps": 0}, "logging_steps: 0 is out of range: "),
    # ValueError: tensorbord is not supported, only azure_ml, ... (after the model loaded)
    "misspelt report_to": ("harc", {"report_to": "tensorbord"},
                           "report_to: tensorbord names no logger of transformers (azure_ml, "),
}


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("case", list(CASES))
def test_a_host_key_mistake_is_one_line_before_loading(case: str, assets: Any, harc_assets: Any,
                                                       tmp_path: Path) -> None:
    stage, overrides, start = CASES[case]
    if callable(overrides):
        overrides = overrides(assets, harc_assets, tmp_path)
    recipe = _recipe(stage, assets, harc_assets, tmp_path / "out", **overrides)
    message = _refused(recipe)
    expected = start(assets, harc_assets, tmp_path, recipe) if callable(start) else start
    assert message.startswith(expected), message


# recipes/accelerate/ holds accelerate launch configs (read by accelerate, tested in
# tests/hera/test_hera_recipe_hardware.py), not LLaMA-Factory recipes
@pytest.mark.parametrize("path", sorted(p for p in REPO.glob("recipes/**/*.yaml") if "accelerate" not in p.parts),
                         ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_the_key_checks(path: Path) -> None:
    host_args, _, _ = split_args(yaml.safe_load(path.read_text(encoding="utf-8")))
    check_host_keys(host_args)


def test_good_values_and_the_command_line_form_pass(harc_assets: Any, assets: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    llama, qwen_vl = str(harc_assets.models["llama3"]), str(assets.models["qwen2_5_vl"])
    for target in ("all", "q_proj,v_proj", ["q_proj", "o_proj"], "self_attn.q_proj"):
        check_lora_target({"model_name_or_path": llama, "lora_target": target})
    check_lora_target({"model_name_or_path": qwen_vl, "lora_target": "q_proj,qkv"})
    check_lora_target({"model_name_or_path": llama, "lora_target": "nothing", "finetuning_type": "full"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()  # a local folder named as the hub id's organisation: the id is still the hub's
    check_model_paths({"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    check_host_keys({"logging_steps": 0, "logging_strategy": "no", "save_strategy": "epoch", "save_steps": 0})
    check_host_keys(["--model_name_or_path", llama, "--no_use_fast_tokenizer", "--learning-rate", "1e-4",
                     "--lr_scheduler_type=cosine", "--do_train", "--rope_scaling", "null"])
    with pytest.raises(ValueError, match=r"^learning_rat: '1e-4' \(did you mean learning_rate\?\)"):
        check_host_keys(["--learning_rat", "1e-4"])
    monkeypatch.setenv("ALLOW_EXTRA_ARGS", "1")  # LLaMA-Factory then ignores unknown keys: so does the check
    check_host_keys({"learning_rat": 1e-4})


@pytest.mark.parametrize(("key", "points_to"), [("use_ray", "USE_RAY=1 llamafactory-cli train"),
                                                ("resources_per_worker", "use ray_num_workers"),
                                                ("ray_storage_path", "output_dir")])
def test_an_older_releases_ray_key_points_to_its_current_form(key: str, points_to: str) -> None:
    """``use_ray: true`` was told "did you mean use_dora?" and ``resources_per_worker`` "preprocessing_num_workers?":
    a retired key names what took its place, not its nearest spelling."""
    with pytest.raises(RecipeError) as refused:
        check_host_keys({key: True})
    line = str(refused.value)
    assert "a key of older LLaMA-Factory releases" in line and points_to in line, line
    assert "did you mean" not in line, line


def test_bf16_where_transformers_finds_no_bf16_device_is_refused() -> None:
    """transformers' "Your setup doesn't support bf16/gpu" came in a 40-line traceback; ``use_cpu: true`` is its way
    to bf16 on the CPU."""
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine has a bf16 device")
    with pytest.raises(ValueError, match=r"^bf16: true, but transformers finds no device here that computes in bf16"):
        check_bf16_device({"bf16": True})
    check_bf16_device(["--bf16", "--use_cpu"])
    check_bf16_device({"bf16": "false"})


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("stage", "key", "value"), [("sft", "do_train", "n"), ("hera", "bf16", "false"),
                                                      ("harc", "overwrite_output_dir", "No"),
                                                      ("hera", "hera_gather", "false"), ("harc", "harc_eval", "no")])
def test_a_quoted_no_for_a_boolean_key_of_a_recipe_dict_is_refused_by_name(
        stage: str, key: str, value: str, assets: Any, harc_assets: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory hands a recipe dict's string to its dataclass as it is (``parse_dict``), where it is true: the
    plugin's ``truthy`` read it false, so under accelerate's FSDP2 default stock ``sft`` with ``do_train: n`` skipped
    the refusal of a run that saves nothing, and loaded the model (``no_model_load`` failed this test before). The
    stage's own flags keep the same rule (``hera_gather: "false"`` was read as false while ``bf16: 'false'`` was
    refused): the same line."""
    from llamafactory.hparams import TrainingArguments
    from transformers import HfArgumentParser

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    if not key.startswith(stage):
        given = {"output_dir": str(tmp_path), "use_cpu": True, key: value}
        parsed = HfArgumentParser(TrainingArguments).parse_dict(given)[0]
        assert getattr(parsed, key) == value and bool(getattr(parsed, key))  # what LLaMA-Factory's Trainer reads: true
    recipe = {k: v for k, v in _recipe(stage.replace("sft", "hera"), assets, harc_assets, tmp_path / "out",
                                       **{key: value}).items()
              if stage != "sft" or not k.startswith("hera_")}
    assert _refused({**recipe, "stage": stage}) == (f"{key}: {value!r} is a string, not a boolean (a recipe's flags "
                                                     "are unquoted: LLaMA-Factory reads any non-empty string as "
                                                     f"true); write {key}: false without quotes (or {key}: true).")


def test_a_flag_of_a_command_line_list_is_read_as_transformers_reads_it() -> None:
    """A ``--key value`` list's flag is parsed by transformers' ``string_to_bool`` (a bare ``--flag`` is true); a dict's
    true words, booleans, an empty string and a non-boolean key's "no" are not refused."""
    from transformers.hf_argparser import string_to_bool

    for word in ("true", "True", "t", "yes", "y", "1", "false", "F", "no", "n", "0"):
        host, _, _ = split_args(["--stage", "sft", "--do_train", word, "--bf16"])
        assert truthy(raw_value(host, "do_train")) is string_to_bool(word) and truthy(raw_value(host, "bf16"))
    for flag in (True, False, "true", "Yes", "", None):
        split_args({"do_train": flag, "bf16": flag, "save_strategy": "no", "template": "n"})
        split_args({"stage": "hera", "hera_gather": flag, "hera_heads": "no", "hera_pooling": "no"})
    assert split_args(["--stage", "hera", "--hera_gather", "false"])[1] == {"hera_gather": "false"}  # parsed later


def test_a_refused_recipe_prints_a_few_lines_the_message_last(assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    """One real ``llamafactory-cli train`` process, refused after LLaMA-Factory's parse and its alignment of the rows:
    ``stage: rah`` on a dataset whose 32 image files are missing. It printed 45 lines: 32 of them LLaMA-Factory's
    converter warnings, one per missing image (so hundreds on a real dataset), above the message
    (:mod:`llamafactory_hera_patches.data.media_warnings` holds them while the plugin checks the files). The check
    also reads
    the model's config after the parse, which turns transformers' info logging on: a template check's reads printed
    every file read and the whole config (145 lines) before its message (that refusal's text:
    tests/test_run_errors.py)."""
    data = _without_images(assets.dataset_dir, tmp_path)
    recipe = _recipe("rah", assets, harc_assets, tmp_path / "out", dataset_dir=str(data))
    proc = run_train(recipe, tmp_path, check=False, process=True)
    # transformers 4.x notes once per process that the harness's WANDB_DISABLED is deprecated: not the run's output
    lines = [line for line in (proc.stdout + proc.stderr).rstrip("\n").split("\n")
             if not line.startswith("Using the `WANDB_DISABLED` environment variable is deprecated")]
    assert proc.returncode == 1 and len(lines) <= 15, "\n".join(lines)
    assert not any("does not exist in `media_dir`" in line for line in lines), "\n".join(lines)
    assert lines[-1].startswith("[llamafactory-hera] error: image 'images/"), "\n".join(lines)
    assert lines[-1].endswith(f"of training dataset row 3 (hera_demo: {data}/hera_demo.json) does not exist; fix the "
                              "path in the dataset (or media_dir) or remove the row"), "\n".join(lines)


def test_a_model_that_cannot_be_built_without_weights_skips_the_lora_target_check(
        harc_assets: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A remote-code model whose class fails on the meta device: one note line, no traceback, the run goes on."""
    import transformers

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Tensor.item() cannot be called on meta tensors\nmore lines")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", fail)
    llama = str(harc_assets.models["llama3"])
    check_lora_target({"model_name_or_path": llama, "lora_target": "no_such_module"})
    # the plugin's line alone (LLaMA-Factory's first import in this process may log its own lines before it)
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("[llamafactory-hera]")] == [
        f"[llamafactory-hera] note: lora_target not checked before loading: {llama}'s model could not be built "
        "without its weights here (RuntimeError: Tensor.item() cannot be called on meta tensors); PEFT checks it once "
        "the model has loaded."]


def test_an_unquoted_no_read_by_yaml_as_false_is_told_to_be_quoted() -> None:
    given = yaml.safe_load("save_strategy: no\neval_strategy: 'no'\n")
    assert given["save_strategy"] is False
    with pytest.raises(RecipeError) as raised:
        check_choices(given)
    assert str(raised.value) == ("save_strategy: False is not a value TrainingArguments accepts (no, steps, epoch, "
                                 "best); YAML reads an unquoted no as false. Quote it: save_strategy: 'no'.")
