"""The run inputs every plugin stage checks before any model loads (recipe/parsed_checks.py), through LLaMA-Factory's
real ``run_exp`` and the stock ``llamafactory-cli``: one line naming the key, the value and the fix where the host
used to end with a traceback (``Undefined dataset``, ``Instruction "train" corresponds to no data!``, ``IndexError``,
``PermissionError`` / ``NotADirectoryError``, ``Unknown task``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from conftest import base_recipe, harc_recipe, offline_env, run_process, run_train
from llamafactory_hera.demo.rah import build_rah_recipe
from llamafactory_hera.recipe.parsed_checks import check_output_dir
from llamafactory_hera_patches.recipe.raw_checks import check_stage

HERA = str(Path(sys.executable).with_name("llamafactory-hera"))


def _recipe(stage: str, assets: Any, harc_assets: Any, out: Path, **overrides: Any) -> dict[str, Any]:
    if stage == "hera":
        return base_recipe(assets, "qwen2_5_vl", out, **overrides)
    if stage == "rah":
        return {**build_rah_recipe(assets, "qwen2_5_vl", out), **overrides}
    return harc_recipe(harc_assets, "llama3", out, **overrides)


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody may create files in (root ignores permission bits: /sys refuses it)."""
    if os.geteuid() == 0:
        return Path("/sys/llamafactory_hera_test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: every error here must come before it."""
    import llamafactory.train.sft.workflow as workflow

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(workflow, "load_model", refuse)
    monkeypatch.setattr(workflow, "load_tokenizer", refuse)


def test_a_llama_3_0_tokenizer_without_the_later_stop_word_keeps_the_llama3_template(harc_assets: Any,
                                                                                    tmp_path: Path) -> None:
    """Llama-3.0 tokenizers lack ``<|eom_id|>``, the llama3 template's second stop word (id 128008 is a reserved
    token there): it only stops generation and never meets the inputs, so the template fits (found by review: the
    check refused recipes/llama3_8b_hera.yaml's model)."""
    import shutil

    from transformers import AutoTokenizer

    from llamafactory_hera.recipe.parsed_checks import check_template

    folder = tmp_path / "llama3_0"
    shutil.copytree(harc_assets.models["llama3"], folder)
    for path in folder.glob("*.json"):
        path.write_text(path.read_text(encoding="utf-8").replace("<|eom_id|>", "<|reserved_special_token_4|>"),
                        encoding="utf-8")
    assert "<|eom_id|>" not in AutoTokenizer.from_pretrained(folder).get_vocab()
    model_args = SimpleNamespace(model_name_or_path=str(folder), trust_remote_code=False, resize_vocab=False)
    for template in ("llama3", "llava_next_llama3"):
        check_template(model_args, SimpleNamespace(template=template))  # no error
    with pytest.raises(ValueError, match="template: qwen does not match"):
        check_template(model_args, SimpleNamespace(template="qwen"))


@pytest.mark.parametrize("stage", ["hera", "rah", "harc"])
def test_an_undefined_dataset_is_named_with_the_ones_there(stage: str, assets: Any, harc_assets: Any,
                                                           tmp_path: Path, no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    recipe = _recipe(stage, assets, harc_assets, tmp_path / "out", dataset="nope")
    data = Path(recipe["dataset_dir"]) / "dataset_info.json"
    listed = ", ".join(sorted(json.loads(data.read_text())))
    with pytest.raises(ValueError) as error:
        run_exp(recipe)
    message = str(error.value)
    assert message.startswith(f"dataset: dataset 'nope' is not in {data} (it lists: {listed}). "), message
    fix = "remove it, or name a dataset listed there" if stage == "harc" else "Name one of those, or add 'nope' to"
    assert fix in message and not (tmp_path / "out").exists()


def test_a_misspelt_eval_dataset_gets_the_closest_name(assets: Any, tmp_path: Path, no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    with pytest.raises(ValueError, match=r"^eval_dataset: dataset 'hera_dem' is not in .* Did you mean 'hera_demo'\?"):
        run_exp(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", eval_dataset="hera_dem"))


def _with_empty(dataset_dir: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(dataset_dir, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / info[name]["file_name"]).write_text("[]\n")
    return copy / info[name]["file_name"]


@pytest.mark.parametrize("role", ["harc_pseudo", "harc_harmless"])
def test_an_empty_harc_role_file_names_the_role_dataset_and_file(role: str, harc_assets: Any, tmp_path: Path,
                                                                 no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    empty = _with_empty(harc_assets.dataset_dir, tmp_path, role)
    with pytest.raises(ValueError) as error:
        run_exp(harc_recipe(harc_assets, "llama3", tmp_path / "out", dataset_dir=str(empty.parent)))
    assert str(error.value).startswith(f"{role}: dataset '{role}' has no rows: its file {empty} is empty. Fill it")


def test_an_empty_dataset_file_of_hera_is_named(assets: Any, tmp_path: Path, no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    empty = _with_empty(assets.dataset_dir, tmp_path, "hera_demo")
    empty.write_text("")
    with pytest.raises(ValueError, match=f"^dataset: dataset 'hera_demo' has no rows: its file {empty} is empty"):
        run_exp(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(empty.parent)))


def test_a_template_of_another_family_is_refused_with_the_right_one(harc_assets: Any, assets: Any, tmp_path: Path,
                                                                    no_model_load: None) -> None:
    """``template: qwen`` on a Llama-3 tokenizer: LLaMA-Factory would add <|im_end|> as a new token the embeddings
    lack (IndexError in the first forward, after loading); refused naming the tokens and the fitting template."""
    from llamafactory.train.tuner import run_exp

    with pytest.raises(ValueError) as error:
        run_exp(harc_recipe(harc_assets, "llama3", tmp_path / "out", template="qwen"))
    assert str(error.value) == (
        f"template: qwen does not match the tokenizer of {harc_assets.models['llama3']} (llama): its special tokens "
        "<|im_end|>, <|im_start|> are not in the vocabulary (they would become new tokens the model's embeddings "
        "lack). Set template: llama3 (also fitting: openchat-3.6), or resize_vocab: true to train new tokens.")
    with pytest.raises(ValueError, match=r"template: llama3 does not match .* Set template: qwen"):
        run_exp(harc_recipe(harc_assets, "qwen2", tmp_path / "out", template="llama3"))
    with pytest.raises(ValueError, match=r"template: qwen2_vl does not match .*\(llava\).* Set template to the "):
        run_exp(base_recipe(assets, "llava", tmp_path / "out", template="qwen2_vl"))


@pytest.mark.parametrize("stage", ["hera", "rah", "harc"])
def test_an_output_dir_that_cannot_be_written_is_refused(stage: str, assets: Any, harc_assets: Any, tmp_path: Path,
                                                          no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    locked = _unwritable(tmp_path) / "out"
    with pytest.raises(ValueError, match=f"^output_dir: {locked} cannot be created \\(it would go into "
                                         f"{locked.parent if locked.parent.exists() else '/sys'}\\): .* Choose a "
                                         "folder you can write to."):
        run_exp(_recipe(stage, assets, harc_assets, locked))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"^output_dir: {a_file / 'out'} cannot be created: {a_file} is a file, not "
                                         "a folder."):
        run_exp(_recipe(stage, assets, harc_assets, a_file / "out"))


def test_output_dir_check_creates_nothing(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "a" / "b")
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_stage_gets_the_closest_stage() -> None:
    stages = ("pt", "sft", "rm", "ppo", "dpo", "kto")
    with pytest.raises(ValueError, match=r"^stage: hra is not a stage; did you mean hera\? stages: hera, rah, harc "
                                         r"\(llamafactory-hera\), pt, sft, rm, ppo, dpo, kto \(LLaMA-Factory\)\.$"):
        check_stage("hra", ["hera", "rah", "harc"], stages)
    for fine in ("sft", "HeRA", None):
        check_stage(fine, ["hera", "rah", "harc"], stages)


def test_one_line_errors_through_the_stock_command_line(assets: Any, tmp_path: Path) -> None:
    """``stage: hra`` and ``dataset: nope`` through ``llamafactory-cli train``: the message alone, no traceback."""
    for name, overrides, message in (
        ("stage", {"stage": "hra"}, "[llamafactory-hera] error: stage: hra is not a stage; did you mean hera? stages: "
                                    "hera, rah, harc (llamafactory-hera), pt, sft"),
        ("dataset", {"dataset": "nope"}, "[llamafactory-hera] error: dataset: dataset 'nope' is not in "),
    ):
        proc = run_train(base_recipe(assets, "qwen2_5_vl", tmp_path / name / "out", **overrides), tmp_path / name,
                         check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and message in text, text[-3000:]
        assert "Traceback" not in text and "Loading weights" not in text


def test_select_refuses_a_recipe_of_another_method_at_once(assets: Any, tmp_path: Path) -> None:
    """A ``stage: rah`` recipe names no HeRA teacher: select used to load for 30 s and then fail to reach
    facebook/dinov2-large; it now says what the recipe is before loading anything. A real process of the installed
    console script (select's one): its exit code and its one-line error, nothing else printed."""
    recipe = tmp_path / "rah.yaml"
    recipe.write_text(yaml.safe_dump(build_rah_recipe(assets, "qwen2_5_vl", tmp_path / "out")), encoding="utf-8")
    proc = run_process([HERA, "select", str(recipe)], cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"llamafactory-hera: error: stage: rah: {recipe} is a RAH-LoRA (training-free "
                                  "head calibration) recipe, not a HeRA recipe (stage: hera); ")
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stdout == "" and not list(tmp_path.glob("*.log"))


def test_harc_with_packing_says_why_through_run_exp(harc_assets: Any, tmp_path: Path, no_model_load: None) -> None:
    from llamafactory.train.tuner import run_exp

    with pytest.raises(ValueError, match=r"^packing: true is not supported by stage: harc: .* Remove packing\.$"):
        run_exp(harc_recipe(harc_assets, "llama3", tmp_path / "out", packing=True))


def test_an_output_dir_removed_while_probed_is_looked_at_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks check output_dir while one of them clears it (seen in CI: rank 1's probe file met a folder rank 0 had
    just removed, "No such file or directory", and rank 1 refused a writable output_dir): the check looks again."""
    import tempfile

    from llamafactory_hera.recipe import parsed_checks as checks

    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    made = tempfile.NamedTemporaryFile

    def removed_first(*args: Any, **kwargs: Any) -> Any:
        if out.exists():
            shutil.rmtree(out)  # the other rank, between the look and the probe
        return made(*args, **kwargs)

    monkeypatch.setattr(checks.tempfile, "NamedTemporaryFile", removed_first)
    check_output_dir(out)  # the folder is gone: its parent takes the probe
