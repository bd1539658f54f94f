"""The checkpoint a run resumes from is checked before LLaMA-Factory parses the recipe
(``recipe/resume.py``), through LLaMA-Factory's real ``run_exp`` with the model load forbidden.

Before, each case below loaded the model and ended in a traceback of about 600 lines: a full Qwen3-VL run from a
Qwen2.5-VL checkpoint (``size mismatch`` while restoring), a full run from a LoRA checkpoint (``Can't find a
checkpoint index``), a LoRA run from a full checkpoint (the optimizer's ``parameter group that doesn't match``),
``resume_from_checkpoint: true`` with no checkpoint (``No valid checkpoint found``); a finished run's output folder
instead of a checkpoint trained on silently (exit 0). Now each is one line naming what the checkpoint holds, what the
recipe asks and the way on. The checkpoints are real: two 1-step runs, once for the module; the variants (other sizes,
freeze, another stage, another rank) are copies of their small files with one value changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from conftest import base_recipe, run_train
from llamafactory_hera.runtime.run_record import RUN_RECORD
from llamafactory_hera.runtime.whole_checkpoints import MARKER
from llamafactory_hera_patches.stacks import installed

ONE_STEP = {"max_samples": 16, "per_device_train_batch_size": 4, "hera_queue_size": 8, "save_strategy": "steps",
            "save_steps": 1, "max_steps": 1}
SMALL_FILES = ("trainer_state.json", "config.json", "adapter_config.json", MARKER)  # what the checks read of one


@pytest.fixture(scope="module")
def runs(assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished 1-step HeRA runs, a checkpoint-1 each: Qwen3-VL LoRA (rank 8) and Qwen2.5-VL full."""
    folder = tmp_path_factory.mktemp("resume_runs")
    made = {"qwen3_vl lora": ("qwen3_vl", "lora"), "qwen2_5_vl full": ("qwen2_5_vl", "full")}
    for name, (family, finetuning) in made.items():
        run_train(base_recipe(assets, family, folder / name, finetuning_type=finetuning, **ONE_STEP), folder)
    return {name: folder / name for name in made}



def _refusal(recipe: dict[str, Any], tmp: Path) -> str:
    """The one error line of a run refused before loading (exit code 1, no traceback, nothing trained)."""
    proc = run_train(recipe, tmp, check=False)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 1, printed[-3000:]
    assert "Traceback" not in printed and "the model was loaded" not in printed, printed[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[llamafactory-hera] error: ")]
    assert len(errors) == 1 and len(printed.splitlines()) <= 4, printed[-3000:]
    assert not (Path(recipe["output_dir"]) / "checkpoint-2").exists()
    return errors[0].removeprefix("[llamafactory-hera] error: ")


def _copy(checkpoint: Path, to: Path, record: dict[str, Any] | None = None, **changed: Any) -> Path:
    """A copy of ``checkpoint``'s small files into ``to/checkpoint-1`` (its run's record beside it, with ``record``
    merged into it), its config (or its adapter's) with ``changed`` merged into it."""
    copy = to / "checkpoint-1"
    copy.mkdir(parents=True)
    for name in SMALL_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, copy / name)
    target = copy / ("adapter_config.json" if (copy / "adapter_config.json").is_file() else "config.json")
    target.write_text(json.dumps({**json.loads(target.read_text()), **changed}))
    saved = json.loads((checkpoint.parent / RUN_RECORD).read_text())
    (to / RUN_RECORD).write_text(json.dumps({**saved, **(record or {}),
                                             "loading": {**saved["loading"], **(record or {}).get("loading", {})}}))
    return copy


def _named(folder: Path) -> str:
    """How a message names the model of ``folder``: its class (config.json's ``architectures``), or its model_type
    where the config has none, which only transformers 4 does (4.57 saves these tiny models' configs without it): a
    transformers 5 config without it is a lost class, which fails here."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if not config.get("architectures"):
        assert Version(installed()).major < 5, f"{folder}/config.json: no architectures on transformers {installed()}"
        return config["model_type"]
    return config["architectures"][0]


def test_a_full_run_from_another_models_checkpoint(assets: Any, runs: dict[str, Path], tmp_path: Path,
                                                   no_model_load: None) -> None:
    """Before: 579 lines, ``size mismatch for model.visual.patch_embed.proj.weight`` after the model loaded."""
    checkpoint = runs["qwen2_5_vl full"] / "checkpoint-1"
    message = _refusal(base_recipe(assets, "qwen3_vl", tmp_path / "out", finetuning_type="full",
                                   resume_from_checkpoint=str(checkpoint)), tmp_path)
    assert message == (
        f"resume_from_checkpoint: {checkpoint} is a stage: hera full checkpoint of {_named(checkpoint)}; "
        f"this recipe trains stage: hera, finetuning_type: full of {_named(assets.models['qwen3_vl'])} (another "
        "architecture). Resume it with the settings of the run that wrote it (model_name_or_path: "
        f"{assets.models['qwen2_5_vl']}), or remove resume_from_checkpoint to train afresh (a new run can start from "
        f"its weights: model_name_or_path: {checkpoint}).")


def test_a_full_run_from_a_lora_checkpoint(assets: Any, runs: dict[str, Path], tmp_path: Path,
                                           no_model_load: None) -> None:
    """Before: 578 lines, the Trainer's ``Can't find a checkpoint index`` after the model loaded."""
    checkpoint = runs["qwen3_vl lora"] / "checkpoint-1"
    message = _refusal(base_recipe(assets, "qwen3_vl", tmp_path / "out", finetuning_type="full",
                                   resume_from_checkpoint=str(checkpoint)), tmp_path)
    assert message.startswith(f"resume_from_checkpoint: {checkpoint} is a stage: hera LoRA (rank 8) checkpoint of "
                              "Qwen3VLForConditionalGeneration; this recipe trains stage: hera, finetuning_type: full "
                              "of Qwen3VLForConditionalGeneration. Resume it with the settings of the run that wrote "
                              "it (finetuning_type: lora), or remove resume_from_checkpoint"), message
    assert message.endswith(f"(a new run can start from its weights: adapter_name_or_path: {checkpoint}).")


def test_a_lora_run_from_a_full_checkpoint(assets: Any, runs: dict[str, Path], tmp_path: Path,
                                           no_model_load: None) -> None:
    """Before: 593 lines, no adapter restored, then the optimizer's ``loaded state dict contains a parameter group
    that doesn't match``."""
    checkpoint = runs["qwen2_5_vl full"] / "checkpoint-1"
    message = _refusal(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", resume_from_checkpoint=str(checkpoint)),
                       tmp_path)
    assert message.startswith(f"resume_from_checkpoint: {checkpoint} is a stage: hera full checkpoint of "
                              f"{_named(checkpoint)}; this recipe trains stage: hera, finetuning_type: lora "
                              f"(lora_rank: 8) of {_named(assets.models['qwen2_5_vl'])}. Resume it with the settings "
                              "of the run that wrote it (finetuning_type: full), or "), message


def test_true_with_nothing_to_resume(assets: Any, tmp_path: Path, no_model_load: None) -> None:
    """Before: 570 lines, transformers' ``No valid checkpoint found in output directory`` after the model loaded."""
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)  # a folder holding something else than a run
    message = _refusal(base_recipe(assets, "qwen3_vl", out, resume_from_checkpoint=True, overwrite_output_dir=False),
                       tmp_path)
    assert message == (f"resume_from_checkpoint: true resumes the last checkpoint of output_dir: {out}, which holds "
                       "no checkpoint-N folder and no run record of this stage: there is nothing to resume. Remove "
                       "resume_from_checkpoint to train afresh, or name a checkpoint of an earlier run (its "
                       "OUTPUT_DIR/checkpoint-N).")
    (out / "notes").rmdir()
    (out / "checkpoint-1").mkdir()  # a run killed inside its first save
    (out / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"")
    assert f"{out}, whose checkpoints (checkpoint-1) are all half-written (saves that did not finish on every rank): " \
        "there is nothing to resume." in _refusal(base_recipe(assets, "qwen3_vl", out, resume_from_checkpoint=True,
                                                               overwrite_output_dir=False), tmp_path)
    # overwrite_output_dir moves the folder's checkpoints aside before the Trainer would look for them
    assert "but overwrite_output_dir: true moves that folder's files aside first" in _refusal(
        base_recipe(assets, "qwen3_vl", out, resume_from_checkpoint=True, overwrite_output_dir=True), tmp_path)


def test_a_finished_runs_folder_is_not_a_checkpoint(assets: Any, runs: dict[str, Path], tmp_path: Path,
                                                    no_model_load: None) -> None:
    """Before: accepted (the folder has the run's end trainer_state.json): trained on from the end with no optimizer
    state, or no step at all, exit 0, and the model written again."""
    finished = runs["qwen3_vl lora"]
    message = _refusal(base_recipe(assets, "qwen3_vl", tmp_path / "out", resume_from_checkpoint=str(finished)),
                       tmp_path)
    assert message == (
        f"resume_from_checkpoint: {finished} is a run's output folder, not a checkpoint: resuming from it restores no "
        "optimizer state and trains on from that run's end (no step when it reached max_steps). Name "
        f"resume_from_checkpoint: {finished / 'checkpoint-1'} (its last checkpoint) to train that run further, or, "
        f"for a new run from its final model, set adapter_name_or_path: {finished} and remove "
        "resume_from_checkpoint.")


# (what the copy changes: its run record, its config or adapter config; the recipe's overrides; the message's part)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str]] = {
    "other sizes": ("qwen2_5_vl full", {}, {"text_config": {"hidden_size": 96, "num_hidden_layers": 4}},
                    {"finetuning_type": "full"},
                    "(other sizes: text_config.hidden_size 96 there, 64 here, text_config.num_hidden_layers 4 there, "
                    "2 here)"),
    "freeze for full": ("qwen2_5_vl full", {"loading": {"finetuning_type": "freeze"}}, {},
                        {"finetuning_type": "full"}, "is a stage: hera freeze checkpoint of {checkpoint}"),
    "another stage": ("qwen2_5_vl full", {"stage": "sft"}, {}, {"finetuning_type": "full"},
                      "settings of the run that wrote it (stage: sft)"),
    "another rank": ("qwen3_vl lora", {}, {}, {"lora_rank": 16}, "LoRA (rank 8) checkpoint of {checkpoint}; this "
                     "recipe trains stage: hera, finetuning_type: lora (lora_rank: 16) of "),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_checkpoint_of_another_kind_of_run(variant: str, assets: Any, runs: dict[str, Path], tmp_path: Path,
                                             no_model_load: None) -> None:
    run, record, config, overrides, part = VARIANTS[variant]
    if "text_config" in config:
        saved = json.loads((runs[run] / "checkpoint-1" / "config.json").read_text())
        config = {"text_config": {**saved["text_config"], **config["text_config"]}}
    checkpoint = _copy(runs[run] / "checkpoint-1", tmp_path / "earlier", record, **config)
    family = "qwen3_vl" if run.startswith("qwen3_vl") else "qwen2_5_vl"
    message = _refusal(base_recipe(assets, family, tmp_path / "out", resume_from_checkpoint=str(checkpoint),
                                   **overrides), tmp_path)
    named = checkpoint if (checkpoint / "config.json").is_file() else assets.models[family]  # LoRA: its base model
    assert part.format(checkpoint=_named(named)) in message, message


def test_true_and_an_unfinished_output_dir_resolve_as_transformers_does(assets: Any, runs: dict[str, Path],
                                                                        tmp_path: Path, no_model_load: None) -> None:
    """``true``: the output_dir's last checkpoint-N (by number: 10 after 9); not given, LLaMA-Factory's own resume of
    an unfinished output_dir: both checked as a named checkpoint is."""
    out = tmp_path / "out"
    _copy(runs["qwen3_vl lora"] / "checkpoint-1", out, {"status": "running"})  # killed after step 10
    (out / "checkpoint-1").rename(out / "checkpoint-10")
    _copy(runs["qwen2_5_vl full"] / "checkpoint-1", tmp_path / "other")
    shutil.copytree(tmp_path / "other" / "checkpoint-1", out / "checkpoint-9")
    full = {"finetuning_type": "full", "overwrite_output_dir": False}
    message = _refusal(base_recipe(assets, "qwen3_vl", out, resume_from_checkpoint=True, **full), tmp_path)
    assert message.startswith("resume_from_checkpoint: true (the last checkpoint of output_dir) "
                              f"{out / 'checkpoint-10'} is a stage: hera LoRA (rank 8) checkpoint"), message
    message = _refusal(base_recipe(assets, "qwen3_vl", out, **full), tmp_path)
    assert message.startswith(f"output_dir: {out} holds an unfinished run, which LLaMA-Factory resumes from its last "
                              f"checkpoint; {out / 'checkpoint-10'} is a stage: hera LoRA (rank 8) checkpoint"), message
    assert message.endswith("set overwrite_output_dir: true to train afresh (its files move aside), or another "
                            "output_dir (a new run can start from its weights: adapter_name_or_path: "
                            f"{out / 'checkpoint-10'}).")


def test_not_a_checkpoint(assets: Any, tmp_path: Path, no_model_load: None) -> None:
    """A folder without the Trainer's state, or with it and no weights, names what it lacks."""
    folder = tmp_path / "plain"
    folder.mkdir()
    recipe = base_recipe(assets, "qwen3_vl", tmp_path / "out", resume_from_checkpoint=str(folder))
    assert _refusal(recipe, tmp_path) == (f"resume_from_checkpoint: {folder} is not a Trainer checkpoint (it has no "
                                          "trainer_state.json). Name a checkpoint of an earlier run (its "
                                          "OUTPUT_DIR/checkpoint-N), or remove resume_from_checkpoint to train "
                                          "afresh.")
    (folder / "trainer_state.json").write_text("{}")
    assert _refusal(recipe, tmp_path).startswith(f"resume_from_checkpoint: {folder} holds no model weights (no "
                                                 "adapter_config.json, no model.safetensors")


def test_the_checkpoint_of_the_same_kind_of_run_passes(assets: Any, runs: dict[str, Path]) -> None:
    """The run each checkpoint came from passes the check (a renamed checkpoint folder too); a resume that trains
    on: tests/hera/test_hera_resume_weights.py, test_output_dir.py (an interrupted run), harc/test_harc_stage.py."""
    from llamafactory_hera.recipe.resume import check_resume

    for name, family, finetuning in (("qwen3_vl lora", "qwen3_vl", "lora"),
                                     ("qwen2_5_vl full", "qwen2_5_vl", "full")):
        recipe = base_recipe(assets, family, runs[name].parent / "again", finetuning_type=finetuning,
                             resume_from_checkpoint=str(runs[name] / "checkpoint-1"))
        check_resume("hera", recipe)
        check_resume("hera", [f"--{key}={value}" for key, value in recipe.items() if not isinstance(value, list)])
    # lora_rank=8 from the command line comes as text; the checkpoint's adapter_config.json holds r: 8, a number
    lora = base_recipe(assets, "qwen3_vl", runs["qwen3_vl lora"].parent / "again",
                       resume_from_checkpoint=str(runs["qwen3_vl lora"] / "checkpoint-1"))
    check_resume("hera", {**lora, "lora_rank": "8"})
    check_resume("hera", [*(f"--{key}={value}" for key, value in lora.items() if not isinstance(value, list)),
                          "--lora_rank", "8"])


def test_a_taken_pin_passes_once_its_run_saved_since_even_when_rotated_away(assets: Any, tmp_path: Path) -> None:
    """A pin an earlier start took (its run's record says so) with a whole checkpoint saved since: the check before the
    parse checks that checkpoint, which the trainer resumes from, so the pin itself may be gone (rotated away by
    save_total_limit). A pin the record does not hold (another one: a rollback) is checked as it is."""
    from llamafactory_hera.recipe.resume import check_resume
    from llamafactory_hera.runtime.errors import RecipeError
    from llamafactory_hera.runtime.run_record import write_started
    from llamafactory_hera.runtime.whole_checkpoints import LINEAGE, newest_since, take, write_marker

    out, pin = tmp_path / "out", tmp_path / "out" / "checkpoint-1"
    write_started(out, "hera", {}, marks=True)
    entry = take(out, pin)
    since = out / "checkpoint-2"
    since.mkdir()
    (since / "trainer_state.json").write_text("{}")
    (since / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    write_marker(since, 2, 1, {LINEAGE: entry[LINEAGE]})
    recipe = base_recipe(assets, "qwen2_5_vl", out, resume_from_checkpoint=str(pin), lora_rank=8)
    check_resume("hera", recipe)  # the pin is gone: checkpoint-2 is checked
    assert newest_since(out, pin) == since
    with pytest.raises(RecipeError, match=r"resume_from_checkpoint: .*checkpoint-3 is not a folder"):
        check_resume("hera", {**recipe, "resume_from_checkpoint": str(out / "checkpoint-3")})


def test_each_rollback_continues_its_own_branch_never_an_abandoned_one(tmp_path: Path) -> None:
    """A pin taken, rolled back to another, then back to the first: each requeue of the same command continues the
    branch its start took. The first branch's checkpoint-4, abandoned by the rollbacks, is never resumed, even when
    the pin that began it is taken again."""
    from llamafactory_hera.runtime.run_record import write_started
    from llamafactory_hera.runtime.whole_checkpoints import LINEAGE, newest_since, take, write_marker

    out = tmp_path / "out"
    write_started(out, "hera", {}, marks=True)
    first = out / "checkpoint-1"
    second = out / "checkpoint-2"

    def saved(step: int, entry: dict[str, Any]) -> Path:
        folder = out / f"checkpoint-{step}"
        folder.mkdir(exist_ok=True)
        (folder / "trainer_state.json").write_text("{}")
        write_marker(folder, step, 1, {LINEAGE: entry[LINEAGE]})
        return folder

    branch = take(out, first)
    for step in (2, 3, 4):
        abandoned = saved(step, branch)
    assert newest_since(out, first) == abandoned  # a requeue of the first branch goes on from its newest
    assert newest_since(out, second) is None  # a rollback to checkpoint-2: not taken yet, taken as it is
    branch = take(out, second)
    kept = saved(3, branch)
    assert newest_since(out, second) == kept  # not the first branch's checkpoint-4
    assert newest_since(out, first) is None  # the second rollback, to the first pin: taken afresh
    branch = take(out, first)
    kept = saved(2, branch)
    assert newest_since(out, first) == kept != abandoned


def test_another_stages_run_is_never_taken_as_this_run_stopped_before_its_first_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``resume_from_checkpoint: true`` in an output_dir that holds a stock sft run with no checkpoint: taken as this
    stage's run stopped before one, HeRA would start there and mix its files with sft's. Only a record of this stage
    is; another's is nothing to resume, named."""
    from llamafactory_hera.recipe.resume import check_resume
    from llamafactory_hera.runtime.errors import RecipeError
    from llamafactory_hera.runtime.run_record import write_started

    out = tmp_path / "out"
    write_started(out, "sft", {})
    given = {"resume_from_checkpoint": True, "output_dir": str(out), "do_train": True}
    with pytest.raises(RecipeError, match="no checkpoint-N folder and no run record of this stage: there is nothing"):
        check_resume("hera", given)
    write_started(out, "hera", {})
    check_resume("hera", given)
    assert "holds no whole checkpoint of its run yet (stopped before one)" in capsys.readouterr().out


def test_true_in_a_folder_holding_only_a_jobs_own_files_starts_the_run(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """The first start of a SLURM job with ``resume_from_checkpoint: true`` (the same command on every start): its
    output_dir holds only what a job's processes write before the run (the ranks' claim, the heartbeat folder an
    earlier plugin version's watchdog left in a start killed before its end): the run starts, with its line, instead
    of being refused as a folder with nothing to resume."""
    from llamafactory_hera.recipe.resume import WATCHDOG_FOLDER, check_resume
    from llamafactory_hera.runtime.claim_folders import CLAIM
    from llamafactory_hera.runtime.shared_output import PROBE_PREFIX

    out = tmp_path / "out"
    (out / WATCHDOG_FOLDER).mkdir(parents=True)
    (out / WATCHDOG_FOLDER / "rank-1.json").write_text("{}")
    (out / CLAIM).write_text("{}")
    (out / f"{PROBE_PREFIX}token").write_text("{}")  # a failed two-node start's probe, left behind
    check_resume("hera", {"resume_from_checkpoint": True, "output_dir": str(out), "do_train": True})
    assert f"output_dir: {out} holds no run yet: starting it" in capsys.readouterr().out
