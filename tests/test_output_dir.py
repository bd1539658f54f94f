"""The same command again: a finished run's output_dir is refused, an interrupted one resumes, and
``overwrite_output_dir: true`` leaves no file of the earlier run beside the new one (patches/.../output_dir.py).

Every run through LLaMA-Factory's ``run_exp`` on the tiny Qwen2.5-VL, HeRA with LoRA, one optimizer step or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_run_errors import _recipe
from transformers import TrainerCallback

from conftest import base_recipe, isolated_run, run_train
from llamafactory_hera.runtime import output_dir
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_record import RUN_RECORD
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

# the shipped recipes' way: no overwrite_output_dir (the test recipes set it)
ONE_STEP = {"max_steps": 1, "max_samples": 16, "overwrite_output_dir": None}


def _error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("[llamafactory-hera] error: "))


def test_a_finished_run_is_refused_before_anything_loads(assets, tmp_path: Path) -> None:
    """Before: LLaMA-Factory resumed from the last checkpoint and wrote over the final model (with checkpoints), or
    raised its ValueError (without)."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, save_strategy="steps", save_steps=1, **ONE_STEP)
    run_train(recipe, tmp_path / "first")
    adapter = (out / "adapter_model.safetensors").read_bytes()
    proc = run_train(recipe, tmp_path / "again", check=False)
    assert proc.returncode == 1
    assert _error_line(proc.stderr) == (
        f"[llamafactory-hera] error: output_dir: {out} holds a finished run ({RUN_RECORD} says finished); training "
        "again would resume it or write over its model. Set another output_dir for a new run, or "
        f"overwrite_output_dir: true to move that run's files into {out}/previous_run_<time>/ and train afresh. To "
        f"train that run further, set another output_dir and resume_from_checkpoint: {out}/checkpoint-1 (one of its "
        "checkpoints). To continue it here from its last checkpoint (checkpoint-1), ask for more than it took: "
        "max_steps above 1, or without max_steps num_train_epochs above 0.5.")
    assert "loading weights file" not in proc.stdout + proc.stderr and "Resuming" not in proc.stdout + proc.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"


def _steps(out: Path) -> int:
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


@pytest.mark.parametrize("stage", ["sft", "hera"])
def test_a_finished_run_asked_for_more_steps_continues_in_its_folder(stage: str, assets, tmp_path: Path) -> None:
    """A 2-step LoRA run (saving every 500 steps, and at its end), then its recipe with max_steps: 3 (stock
    LLaMA-Factory's way; before, refused as a finished run): resumed from checkpoint-2 to step 3, the record finished
    again; that recipe once more is refused (stock would train a step past max_steps and write over the final model).
    ``sft``: the plain stage (no hera_* key: no record, its final adapter tells), ``hera``: the plugin's."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "max_steps": 2, "save_strategy": "steps"})
    if stage == "sft":
        recipe = {key: value for key, value in recipe.items() if not key.startswith("hera_")} | {"stage": "sft"}
    run_train(recipe, tmp_path / "first")
    assert _steps(out) == 2 and (out / "checkpoint-2").is_dir()
    proc = run_train({**recipe, "max_steps": 3}, tmp_path / "more")
    assert f"Resuming training from {out / 'checkpoint-2'}" in proc.stdout + proc.stderr
    assert _steps(out) == 3 and (out / "checkpoint-3").is_dir()
    if stage == "sft":
        assert not (out / RUN_RECORD).exists()
    else:
        assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"
    adapter = (out / "adapter_model.safetensors").read_bytes()
    proc = run_train({**recipe, "max_steps": 3}, tmp_path / "again", check=False)
    assert proc.returncode == 1
    assert _error_line(proc.stderr).endswith(
        "(one of its checkpoints). To continue it here from its last checkpoint (checkpoint-3), ask for more than it "
        "took: max_steps above 3, or without max_steps num_train_epochs above 1.5.")
    assert "loading weights file" not in proc.stdout + proc.stderr
    assert _steps(out) == 3 and (out / "adapter_model.safetensors").read_bytes() == adapter


def test_a_finished_run_trains_further_from_its_checkpoint_into_another_output_dir(assets, tmp_path: Path) -> None:
    """Its recipe again with resume_from_checkpoint into its own folder is refused (naming the checkpoint); the way
    the message gives, another output_dir with that resume_from_checkpoint and more steps, continues from it."""
    out, further = tmp_path / "out", tmp_path / "further"
    recipe = base_recipe(assets, "qwen2_5_vl", out, save_strategy="steps", save_steps=1, **ONE_STEP)
    run_train(recipe, tmp_path / "first")
    checkpoint = out / "checkpoint-1"
    proc = run_train({**recipe, "resume_from_checkpoint": str(checkpoint)}, tmp_path / "again", check=False)
    assert proc.returncode == 1
    assert f"set another output_dir and resume_from_checkpoint: {checkpoint} (one of its checkpoints). " \
        in _error_line(proc.stderr)
    assert _error_line(proc.stderr).endswith("and leave resume_from_checkpoint unset.")
    more = {**recipe, "max_steps": 2, "resume_from_checkpoint": str(checkpoint)}
    proc = run_train({**more, "output_dir": str(further)}, tmp_path / "further_run")
    assert "Resuming training from checkpoint with epoch 0 and global step 1" in proc.stdout + proc.stderr
    assert json.loads((further / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.parametrize("stage", ["hera", "rah", "harc", "sft"])
@pytest.mark.parametrize("evidence", ["record", "model"])
def test_every_stage_refuses_a_finished_run_of_any_kind(stage: str, evidence: str, assets, harc_assets,
                                                         tmp_path: Path) -> None:
    """The folder of a finished run the plugin recorded, or of one with a final model and no record (a plain
    LLaMA-Factory run: before, its ValueError with a traceback)."""
    out = tmp_path / "out"
    out.mkdir()
    if evidence == "record":
        (out / RUN_RECORD).write_text(json.dumps({"stage": "rah", "status": "finished"}), encoding="utf-8")
    else:
        (out / "adapter_model.safetensors").write_bytes(b"")
    recipe = {**_recipe("hera" if stage == "sft" else stage, assets, harc_assets, out), "overwrite_output_dir": False}
    proc = run_train({**recipe, "stage": stage}, tmp_path / "run", check=False)
    assert proc.returncode == 1
    why = f"{RUN_RECORD} says finished" if evidence == "record" else "its final adapter_model.safetensors"
    assert _error_line(proc.stderr).startswith(f"[llamafactory-hera] error: output_dir: {out} holds a finished run "
                                               f"({why}); ")
    assert len(list(out.iterdir())) == 1


class _Interrupt(Exception):
    pass


class _StopAt(TrainerCallback):
    """A crash at the end of optimizer step ``step``, before its checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201 - the Trainer's signature
        if state.global_step == self.step:
            raise _Interrupt(f"stopped at step {self.step}")


def test_an_interrupted_run_resumes_and_ends_as_the_run_not_stopped(assets, tmp_path: Path) -> None:
    from llamafactory.train.tuner import run_exp  # in this process, with a callback that crashes the run

    common = {**ONE_STEP, "max_steps": 2, "save_strategy": "steps", "save_steps": 1, "hera_lambda": 1.0}
    whole, out = tmp_path / "whole", tmp_path / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", whole, **common), tmp_path / "w")
    recipe = base_recipe(assets, "qwen2_5_vl", out, **common)
    with isolated_run(tmp_path, {}), pytest.raises(_Interrupt):
        run_exp(recipe, callbacks=[_StopAt(2)])
    assert (out / "checkpoint-1").is_dir() and not (out / "adapter_model.safetensors").exists()
    proc = run_train(recipe, tmp_path / "again")  # the same command again
    assert f"Resuming training from {out / 'checkpoint-1'}" in proc.stdout + proc.stderr
    assert_resumed_equals_whole(whole, out, 2)


def test_overwrite_moves_every_file_of_the_earlier_run_aside(assets, tmp_path: Path) -> None:
    """A finished HeRA run with another method's files beside it (a RAH run's profile, an eval report and cache):
    the new run's folder holds its own files alone, the earlier ones are in one previous_run_* folder."""
    out = tmp_path / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP), tmp_path / "first")
    others = ("rah_profile.json", "rah_profile.png", "eval_report_vs_base.json", "eval_report_vs_base.md")
    for name in others:
        (out / name).write_text("{}", encoding="utf-8")
    (out / "eval_cache").mkdir()
    (out / "eval_cache" / "answers.jsonl").write_text("{}\n", encoding="utf-8")
    before = sorted(path.name for path in out.iterdir())
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "overwrite_output_dir": True}),
                     tmp_path / "again")
    aside = [path for path in out.iterdir() if path.name.startswith("previous_run_")]
    assert len(aside) == 1 and sorted(path.name for path in aside[0].iterdir()) == before
    line = next(line for line in proc.stdout.splitlines() if "overwrite_output_dir: moved" in line)
    assert f"out of {out} into {aside[0].name}/ (" in line
    now = {path.name for path in out.iterdir()}
    assert not now & {*others, "eval_cache"} and {"adapter_model.safetensors", RUN_RECORD} <= now
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"


def test_overwrite_refuses_to_move_a_checkpoint_it_resumes_from(assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}", encoding="utf-8")
    # a LoRA checkpoint as far as recipe/resume.py reads one before the parse
    (out / "checkpoint-1" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}', encoding="utf-8")
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "overwrite_output_dir": True},
                         resume_from_checkpoint=str(out / "checkpoint-1"))
    proc = run_train(recipe, tmp_path / "run", check=False)
    assert proc.returncode == 1
    assert _error_line(proc.stderr).startswith(
        f"[llamafactory-hera] error: resume_from_checkpoint: {out / 'checkpoint-1'} lies inside output_dir: {out}, ")
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1"]


def test_an_entry_gone_before_the_move_counts_as_moved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another rank's LlamaBoard log callback deletes running_log.txt between the listing and the move: no
    FileNotFoundError, the rest moves; nothing left to move leaves no empty previous_run_* folder."""
    (tmp_path / "running_log.txt").write_text("", encoding="utf-8")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    entries = output_dir.movable_entries(tmp_path)
    (tmp_path / "running_log.txt").unlink()
    target = output_dir.move_aside(tmp_path, entries)
    assert target is not None and [path.name for path in target.iterdir()] == ["adapter_model.safetensors"]
    assert "(adapter_model.safetensors);" in capsys.readouterr().out
    (target / "adapter_model.safetensors").unlink()
    gone = [tmp_path / "running_log.txt"]
    assert output_dir.move_aside(tmp_path, gone) is None
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


def test_an_overwrite_leaves_llamaboards_files_of_the_run_it_started(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run LlamaBoard started (``LLAMABOARD_WORKDIR``: its folder) keeps the files LlamaBoard wrote there before
    starting it: its config, the command's arguments and, on LLaMA-Factory main, ``webui_subprocess.log``, the run's
    output it is writing (moved, the live log would go on in ``previous_run_*/``). Every file the installed
    LlamaBoard writes into the run's folder before the run is among them (its runner's joins with the run's
    ``args["output_dir"]``)."""
    import importlib.util
    import re

    import llamafactory.extras.constants as constants

    written = {constants.LLAMABOARD_CONFIG, constants.TRAINING_ARGS}
    # read, not imported: LlamaBoard's import (gradio's) costs about 2.5 CPU s
    runner = Path(importlib.util.find_spec("llamafactory.webui.runner").origin).read_text(encoding="utf-8")
    written.update(re.findall(r"os\.path\.join\(args\[\"output_dir\"\], \"([^\"]+)\"\)", runner))
    board = {"llamaboard_config.yaml", "training_args.yaml", "webui_subprocess.log"}
    for name in (*board, "running_log.txt", "adapter_model.safetensors"):
        (tmp_path / name).write_text("", encoding="utf-8")
    monkeypatch.setenv("LLAMABOARD_WORKDIR", str(tmp_path))
    assert [path.name for path in output_dir.movable_entries(tmp_path)] == ["adapter_model.safetensors",
                                                                            "running_log.txt"]
    assert written <= board <= set(output_dir.BOARD_FILES), written


@pytest.mark.parametrize(("each_node", "process", "local", "moves"), [
    (False, 0, 0, True), (False, 2, 0, False), (False, 1, 1, False),
    (True, 2, 0, True), (True, 3, 1, False), (True, 0, 0, True)])
def test_the_main_process_of_the_folder_moves(each_node: bool, process: int, local: int, moves: bool) -> None:
    """The global main process; under save_on_each_node (node-local folders) each node's main process."""
    args = SimpleNamespace(save_on_each_node=each_node, process_index=process, local_process_index=local)
    assert output_dir.moves_here(args) is moves


def test_every_rank_checks_the_move_and_only_the_mover_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    waited: list[bool] = []
    monkeypatch.setattr(output_dir, "_wait_for_the_move", lambda: waited.append(True))
    args = SimpleNamespace(do_train=True, overwrite_output_dir=True, output_dir=str(out), save_on_each_node=False,
                           process_index=1, local_process_index=1)
    with pytest.raises(RecipeError, match="^resume_from_checkpoint: .* lies inside output_dir: "):
        output_dir.clear_for_overwrite({"resume_from_checkpoint": str(out / "checkpoint-1")}, args)
    output_dir.clear_for_overwrite({}, args)  # not the mover: nothing moves, it waits
    assert [path.name for path in out.iterdir()] == ["checkpoint-1"] and waited == [True]
    output_dir.clear_for_overwrite({}, SimpleNamespace(**{**vars(args), "process_index": 0}))
    assert [path.name for path in out.iterdir()][0].startswith("previous_run_") and waited == [True, True]


@pytest.mark.parametrize(("recipe", "continues"), [
    ({"max_steps": 5}, True), ({"max_steps": 4}, False), ({"max_steps": 3}, False),
    ({"max_steps": -1, "num_train_epochs": 3}, True), ({"num_train_epochs": 2}, False), ({}, True),
    ({"num_train_epochs": "2.0"}, False), ({"max_steps": 5, "resume_from_checkpoint": "checkpoint-4"}, True),
    ({"max_steps": 5, "resume_from_checkpoint": "checkpoint-2"}, False),
    # false: the Trainer would start at step 0 in the finished run's folder and write over its model
    ({"max_steps": 5, "resume_from_checkpoint": False}, False),
    ({"max_steps": 5, "resume_from_checkpoint": True}, True)])
def test_a_recipe_continues_a_finished_run_when_it_asks_for_more(recipe: dict, continues: bool,
                                                                 tmp_path: Path) -> None:
    """A finished run of 4 steps, 2 epochs, checkpoints at 2 and 4: more steps (max_steps), or without max_steps
    more epochs (num_train_epochs, the Trainer's default 3), from its last checkpoint alone."""
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 2.0}), encoding="utf-8")
    if isinstance(recipe.get("resume_from_checkpoint"), str):
        recipe = {**recipe, "resume_from_checkpoint": str(tmp_path / recipe["resume_from_checkpoint"])}
    assert output_dir.continues_finished(tmp_path, recipe) is continues
    if recipe.get("resume_from_checkpoint") is True:
        return  # on the command line "true" is a path to the Trainer
    as_list = [token for key, value in recipe.items() for token in (f"--{key}", str(value))]  # command-line form
    assert output_dir.continues_finished(tmp_path, as_list) is continues


def test_a_finished_run_without_a_checkpoint_or_its_state_is_not_continued(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 2.0}), encoding="utf-8")
    assert not output_dir.continues_finished(tmp_path, {"max_steps": 9})
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "trainer_state.json").unlink()
    assert not output_dir.continues_finished(tmp_path, {"max_steps": 9})


def test_a_finished_runs_folder_is_refused_by_the_launcher_before_torchrun(assets, tmp_path: Path) -> None:
    """``llamafactory-cli train`` under torchrun on a finished run's folder: before, the refusal came from the ranks,
    followed by torchrun's ChildFailedError report of each failed rank; now the launcher's check before the ranks
    start refuses it (tests/test_multinode.py: one line on each node and no report)."""
    from llamafactory_hera.runtime.run_record import write_ended, write_started
    from llamafactory_hera_patches.launch import check_before_ranks

    out = tmp_path / "out"
    write_ended(write_started(out, "hera", {}), None)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP)), encoding="utf-8")
    with pytest.raises(RecipeError, match=rf"^output_dir: {out} holds a finished run \({RUN_RECORD} says finished\)"):
        check_before_ranks(["llamafactory-cli", "train", str(path)])


@pytest.mark.parametrize("shared", [True, False])
def test_each_node_sees_the_others_probe_or_refuses(shared: bool, tmp_path: Path) -> None:
    """Two nodes' local ranks 0 (threads here) write a probe into output_dir and read each other's, through one store.
    A folder both see passes and keeps no probe; a folder of each node's own disk (two folders here) is refused on
    both nodes, naming the node and file not seen (before: the run ended with rank 1's RNG state on node 1's disk,
    and its requeue in a collective mismatch)."""
    import threading

    import torch.distributed as dist

    from llamafactory_hera.runtime.shared_output import PROBE_PREFIX, check_shared

    store, errors = dist.HashStore(), {}
    folders = [tmp_path / "shared"] * 2 if shared else [tmp_path / "node0", tmp_path / "node1"]

    def node(rank: int) -> None:
        try:
            check_shared(folders[rank], store, "probe/", rank, 2, wait=30, seen=0.5)
        except RecipeError as error:
            errors[rank] = str(error)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [path for folder in folders for path in folder.iterdir()]  # every probe removed
    if shared:
        assert errors == {}
        return
    assert sorted(errors) == [0, 1]
    assert errors[1].startswith(f"output_dir: {folders[1]} is not one folder shared by the job's 2 nodes: node 1 (")
    assert "does not see the files the others wrote into it (node 0 (" in errors[1] and PROBE_PREFIX in errors[1]
    assert errors[1].endswith("Set output_dir to a folder every node mounts (NFS, Lustre, GPFS).")


def test_a_probe_a_stale_attribute_cache_hides_is_seen_by_listing_the_folder(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """NFS answers a stat of a file another node just wrote from its attribute cache (no such file) until the folder is
    listed: without the listing a shared output_dir was refused as a node's own disk, a healthy job never started."""
    from llamafactory_hera.runtime import shared_output

    probe = tmp_path / f"{shared_output.PROBE_PREFIX}other"
    probe.write_text("{}")
    monkeypatch.setattr(Path, "is_file", lambda path: False)  # the cache's answer, however long it is asked
    assert shared_output._seen(probe, 0.0)
    assert not shared_output._seen(tmp_path / f"{shared_output.PROBE_PREFIX}never", 0.0)


def test_local_rank_0_of_each_node_probes_after_the_parse(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """What a rank reads to take part (:func:`refuse_unshared`): its node from its rank over ``LOCAL_WORLD_SIZE``, the
    job's store, each node's ``output_dir``; one node (or ``save_on_each_node: true``) probes nothing. And a run calls
    it after LLaMA-Factory's parse, with the parsed arguments, before its record is written."""
    import threading

    import torch.distributed as dist

    from llamafactory_hera.runtime import shared_output

    store, local, errors = dist.HashStore(), threading.local(), {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: local.rank)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(shared_output, "SEEN_S", 0.5)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("GROUP_RANK", raising=False)

    def node(rank: int, each_node: bool = False) -> None:
        local.rank = rank
        args = SimpleNamespace(output_dir=str(tmp_path / f"node{rank}"), save_on_each_node=each_node)
        try:
            shared_output.refuse_unshared(args)
        except RecipeError as error:
            errors[rank] = str(error)

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one node of two ranks: nothing to probe
    node(0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    node(1, each_node=True)
    assert errors == {} and not (tmp_path / "node0").exists() and not (tmp_path / "node1").exists()
    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(errors) == [0, 1] and "node 0 (" in errors[1] and "node 1 (" in errors[0], errors
    monkeypatch.undo()
    seen: list[Any] = []
    monkeypatch.setattr(shared_output, "refuse_unshared",
                        lambda args: seen.append((args.output_dir, (Path(args.output_dir) / RUN_RECORD).exists())))
    out = tmp_path / "run"
    run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP), tmp_path)
    assert seen == [(str(out), False)]
