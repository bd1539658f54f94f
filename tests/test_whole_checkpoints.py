"""A killed, preempted or disk-full run loses nothing: resume takes the newest whole checkpoint only
(``runtime/whole_checkpoints.py``, ``training/checkpoints.py``).

In-process HeRA runs through LLaMA-Factory's ``run_exp``: a SIGTERM mid-run saves a whole checkpoint and exits 0; a
full disk at the next checkpoint's marker (after all its files: the Trainer's own rotation must have been held back)
is one line, keeps the earlier checkpoint despite ``save_total_limit: 1`` and marks nothing; a named half-written
checkpoint is refused naming the whole one; ``resume_from_checkpoint: true`` passes over it and ends bit for bit as
the run never stopped. The 2-rank SIGTERM (every rank signalled, as SLURM does): tests/harc/test_harc_preemption.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from conftest import base_recipe, captured, exit_code_of, isolated_run, run_train
from llamafactory_hera.runtime import whole_checkpoints as whole_checkpoints_module
from llamafactory_hera.runtime.run_record import CHECKPOINTS_MARKED, RUN_RECORD, read_record, write_started
from llamafactory_hera.runtime.whole_checkpoints import MARKER, newest_whole, rotate, whole_checkpoints
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

COMMON = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1, "logging_steps": 1,
          "overwrite_output_dir": False}


class _SignalAt(TrainerCallback):
    """Sends this process ``SIGTERM`` as step ``step`` begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _run(recipe: dict[str, Any], tmp: Path, *callbacks: Any) -> tuple[int, str]:
    """``run_exp(recipe, callbacks)`` in this process: (exit code, what it printed)."""
    from llamafactory.train.tuner import run_exp

    out, err = io.StringIO(), io.StringIO()
    tmp.mkdir(parents=True, exist_ok=True)
    with isolated_run(tmp, {}), captured(out, err):
        code = exit_code_of(lambda args: run_exp(args, callbacks=list(callbacks)), recipe)
    return code, out.getvalue() + err.getvalue()


def _line(printed: str, start: str) -> str:
    found = [line for line in printed.splitlines() if start in line]
    assert len(found) == 1, printed[-3000:]
    return found[0]


def test_signal_full_disk_and_half_checkpoint_resume_as_the_run_not_stopped(assets: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    whole, run = tmp_path / "whole" / "out", tmp_path / "run" / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", whole, **COMMON), tmp_path / "whole")
    recipe = base_recipe(assets, "qwen2_5_vl", run, **COMMON)
    # SIGTERM as step 2 begins: one process stops at that step's end, saved whole, exit 0
    code, printed = _run(recipe, tmp_path / "run", _SignalAt(2))
    assert code == 0, printed[-3000:]
    assert _line(printed, "SIGTERM: saved") == (
        f"[llamafactory-hera] SIGTERM: saved the whole checkpoint {run}/checkpoint-2 and stopped; to go on, run the "
        "same command again.")
    assert whole_checkpoints(run) == [run / "checkpoint-2"] and not (run / "adapter_model.safetensors").exists()
    # the disk fills at checkpoint-4's marker, after every file of it: the Trainer's own rotation (save_total_limit: 1)
    # must not have deleted checkpoint-2 by then
    fsync = whole_checkpoints_module._fsync

    def full_disk(path: Path) -> None:
        if path.name == f"{MARKER}.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fsync(path)

    monkeypatch.setattr(whole_checkpoints_module, "_fsync", full_disk)
    code, printed = _run({**recipe, "resume_from_checkpoint": True}, tmp_path / "run")
    monkeypatch.setattr(whole_checkpoints_module, "_fsync", fsync)
    assert code == 1
    assert _line(printed, "error: disk full").startswith(
        f"[llamafactory-hera] error: disk full: the checkpoint {run}/checkpoint-4 could not be written (OSError: "
        f"[Errno 28] No space left on device: '{run}/checkpoint-4/{MARKER}.tmp'); it needs about ")
    assert f"{run}/checkpoint-2 is kept, and is what the same command resumes from" in printed
    assert "Traceback" not in printed
    assert (run / "checkpoint-4" / "trainer_state.json").is_file() and not (run / "checkpoint-4" / MARKER).exists()
    assert newest_whole(run) == (run / "checkpoint-2", [run / "checkpoint-4"])
    # named, it is refused before any model loads; true passes over it and ends as the run never stopped
    code, printed = _run({**recipe, "resume_from_checkpoint": str(run / "checkpoint-4")}, tmp_path / "run")
    assert code == 1 and _line(printed, "error: ") == (
        f"[llamafactory-hera] error: resume_from_checkpoint: {run}/checkpoint-4 is half-written (a save that did not "
        f"finish on every rank: no {MARKER}). Resume from the newest whole checkpoint of its run, "
        f"resume_from_checkpoint: {run}/checkpoint-2.")
    code, printed = _run({**recipe, "resume_from_checkpoint": True}, tmp_path / "run")
    assert code == 0, printed[-3000:]
    assert _line(printed, "resume: passed over") == (
        "[llamafactory-hera] resume: passed over checkpoint-4 (half-written: a save that did not finish on every "
        f"rank; kept, not deleted); resuming from {run}/checkpoint-2.")
    assert_resumed_equals_whole(whole, run, 4)
    assert whole_checkpoints(run) == [run / "checkpoint-4"]  # rotation after the whole save


def test_which_checkpoints_are_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmarked folders count by trainer_state.json only in a run where none is marked and whose record does not say
    it marks (no record here: written before markers); rotation deletes whole ones only, never the newest whole or the
    best."""
    def make(name: str, *files: str) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True)
        for file in files:
            (folder / file).write_text(json.dumps({}))
        return folder

    old = [make(f"old/checkpoint-{n}", "trainer_state.json") for n in (2, 4)]
    make("old/checkpoint-6", "adapter_model.safetensors")  # killed before its trainer_state.json
    assert newest_whole(tmp_path / "old") == (old[1], [tmp_path / "old" / "checkpoint-6"])
    marked = [make(f"new/checkpoint-{n}", "trainer_state.json", MARKER) for n in (2, 4, 6)]
    half = make("new/checkpoint-8", "trainer_state.json")  # rank 0 done, another rank cut short
    assert newest_whole(tmp_path / "new") == (marked[2], [half])
    rotate(tmp_path / "new", 1, str(marked[0]))
    assert sorted((tmp_path / "new").iterdir()) == [marked[0], marked[2], half]
    # a kill amid a rotation's deletion (its files going one by one) leaves a folder no resume takes for whole
    rotate(tmp_path / "new", 1, None)
    assert newest_whole(tmp_path / "new") == (marked[2], [half]) and not marked[0].exists()
    marked[0].mkdir()
    (marked[0] / MARKER).write_text("{}")
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kwargs: deleted.append((path / MARKER).exists()))
    rotate(tmp_path / "new", 1, None)
    assert deleted == [False] and whole_checkpoints(tmp_path / "new") == [marked[2]]


def test_a_full_disk_under_the_teacher_store_is_one_warning_with_the_bytes(tmp_path: Path, capsys: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save's writer raises a RuntimeError (``unexpected pos``), not an OSError, when the disk fills: the store
    still only warns, naming the folder and the bytes, and leaves no half-written shard."""
    from llamafactory_hera.hera import teacher_cache

    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(teacher_cache.torch, "save", full)
    monkeypatch.setattr(teacher_cache, "_unwritable_said", set())
    store = teacher_cache.TeacherFeatureStore(tmp_path / "store" / "teacher")
    store.add({"a": torch.zeros(8), "b": torch.zeros(8)}, persist=True)
    [warning] = [line for line in capsys.readouterr().out.splitlines() if "cannot write the cache folder" in line]
    assert f"{tmp_path / 'store' / 'teacher'}, 64 bytes to write: RuntimeError: " in warning, warning
    assert sorted(store.rows) == ["a", "b"] and list((tmp_path / "store").rglob("*.tmp")) == []


def test_the_save_agreement_waits_for_the_sum_of_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host reads the all-reduced count before rank 0 marks a folder whole: an all-reduce that has not summed (as
    NCCL's call returns with the reduction only queued) is not taken for every rank's save."""
    from llamafactory_hera.training import checkpoints

    monkeypatch.setattr(checkpoints.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoints.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(checkpoints.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # both ranks' ones summed
    checkpoints.every_rank_saved(torch.device("cpu"))
    monkeypatch.setattr(checkpoints.dist, "all_reduce", lambda tensor: None)  # queued, not summed
    with pytest.raises(RuntimeError, match="1 of 2 ranks saved"):
        checkpoints.every_rank_saved(torch.device("cpu"))


def test_a_full_disk_at_the_first_save_is_told_by_the_free_space(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save on a full disk raises a RuntimeError with no errno ("unexpected pos"): with no whole checkpoint yet to
    size the need, a disk with under NEARLY_FULL bytes free is taken for full, a roomy one is not (the error stays
    the error)."""
    from collections import namedtuple

    from llamafactory_hera.training import checkpoints

    usage = namedtuple("usage", "total used free")
    error = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                         "data/0: file write failed")
    for free, full in ((checkpoints.NEARLY_FULL - 1, True), (10 * checkpoints.NEARLY_FULL, False)):
        monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path, free=free: usage(1 << 40, 0, free))
        assert (checkpoints.full_line(tmp_path, tmp_path, error) is not None) is full


def test_a_runs_first_checkpoint_is_whole_only_with_its_marker(tmp_path: Path) -> None:
    """A stage that marks its checkpoints records it: its first checkpoint, killed after rank 0 wrote
    trainer_state.json while another rank still wrote, is half-written though no folder of the run is marked; a
    requeue (checkpoints kept) keeps the record's word, and a run started before markers keeps its fallback."""
    new, old = tmp_path / "new", tmp_path / "old"
    write_started(new, "hera", {}, marks=True)
    (new / "checkpoint-2").mkdir()
    (new / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert newest_whole(new) == (None, [new / "checkpoint-2"])
    write_started(new, "hera", {}, marks=True)  # the requeue's record
    assert read_record(new / RUN_RECORD)[CHECKPOINTS_MARKED] is True and whole_checkpoints(new) == []
    (old / "checkpoint-2").mkdir(parents=True)
    (old / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (old / RUN_RECORD).write_text(json.dumps({"stage": "hera", "status": "running"}))  # written before markers
    write_started(old, "hera", {}, marks=True)  # resumed by a plugin that marks
    assert read_record(old / RUN_RECORD)[CHECKPOINTS_MARKED] is False
    assert whole_checkpoints(old) == [old / "checkpoint-2"]
    assert read_record(write_started(tmp_path / "sft", "sft", {}))[CHECKPOINTS_MARKED] is False  # a stock stage


@pytest.mark.parametrize("error", [
    OSError("[Errno 122] Disk quota exceeded"),  # the quota's text, no errno
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
                 "device\" })"),  # safetensors' SafetensorError
])
def test_a_full_disks_text_is_a_full_disk_on_a_disk_with_free_space(error: Exception, tmp_path: Path) -> None:
    """A quota or safetensors' text says the disk is full though the file system has room (a quota per user): the
    disk-full line, not the raw error."""
    from llamafactory_hera.training import checkpoints

    assert shutil.disk_usage(tmp_path).free > checkpoints.NEARLY_FULL
    assert checkpoints.full_line(tmp_path / "checkpoint-2", tmp_path, error).startswith("disk full: the checkpoint ")


def test_every_file_of_a_checkpoint_is_made_durable_subfolders_too(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed saves its shards into ``global_stepN/`` and FSDP into ``pytorch_model_fsdp_0/`` inside the
    checkpoint: each rank's fsync before the agreement reaches the files of those subfolders too."""
    folder = tmp_path / "checkpoint-2"
    files = [folder / "trainer_state.json", folder / "global_step2" / "mp_rank_00_model_states.pt",
             folder / "pytorch_model_fsdp_0" / "__0_0.distcp"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    synced: list[Path] = []
    monkeypatch.setattr(whole_checkpoints_module, "_fsync", synced.append)
    whole_checkpoints_module.make_durable(folder)
    assert set(files) <= set(synced)


def test_the_marker_is_renamed_into_place_then_its_folder_synced(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker is written and fsynced under another name, renamed into place, then the folder is fsynced: the
    rename itself (the folder's entry) is on disk before the run goes on to rotate the older checkpoints."""
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    synced: list[tuple[Path, bool]] = []
    monkeypatch.setattr(whole_checkpoints_module, "_fsync",
                        lambda path: synced.append((path, (folder / MARKER).is_file())))
    whole_checkpoints_module.write_marker(folder, 4, 2)
    assert synced == [(folder / f"{MARKER}.tmp", False), (folder, True)]
    assert json.loads((folder / MARKER).read_text(encoding="utf-8")) == {"step": 4, "ranks": 2}
    assert sorted(path.name for path in folder.iterdir()) == [MARKER]


def test_a_stock_stages_checkpoints_are_whole_by_their_trainer_state(assets: Any, tmp_path: Path) -> None:
    """A recipe's ``stage: sft`` twin (the method's keys, LLaMA-Factory's own trainer, which writes no marker): its run
    record says its checkpoints are not marked, so the checkpoint it saved is whole (else every one of them would be
    taken for half-written, and passed over or refused)."""
    out = tmp_path / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", out, stage="sft", max_steps=1, max_samples=8, save_strategy="steps",
                          save_steps=1, overwrite_output_dir=False), tmp_path)
    record = read_record(out / RUN_RECORD)
    assert record["stage"] == "sft" and record[CHECKPOINTS_MARKED] is False
    assert whole_checkpoints(out) == [out / "checkpoint-1"] and not (out / "checkpoint-1" / MARKER).exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin", "model.safetensors.index.json",
                                  "pytorch_model.bin.index.json"])
def test_every_final_model_format_is_checked_whole(name: str, tmp_path: Path) -> None:
    """A run whose final save failed with its model torn (a full disk) is ``failed``, in every format
    ``save_pretrained`` writes: before, a torn ``adapter_model.bin`` or ``pytorch_model.bin``
    (``save_safetensors: false``) and an index whose shard was torn counted as saved, the run was recorded
    ``finished``, the same command was refused and eval read the torn file. Whole, it is ``finished``."""
    from safetensors.torch import save_file

    from llamafactory_hera.runtime.run_record import write_ended

    tensors = {"lora_A": torch.ones(64, 8), "lora_B": torch.zeros(8, 64)}
    for torn, status in ((True, "failed"), (False, "finished")):
        folder = tmp_path / str(torn)
        path = write_started(folder, "hera", {"seed": 0})
        shard = folder / (name if not name.endswith(".index.json") else "shard-00001-of-00001" + (
            ".safetensors" if name.startswith("model") else ".bin"))
        save_file(tensors, shard) if shard.suffix == ".safetensors" else torch.save(tensors, shard)
        if name.endswith(".index.json"):
            (folder / name).write_text(json.dumps({"weight_map": {key: shard.name for key in tensors}}))
        if torn:
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        write_ended(path, OSError(28, "No space left on device"))
        assert read_record(path)["status"] == status, (name, torn)


def test_a_folder_saved_again_loses_its_marker_first_and_rotation_keeps_the_one_saved(tmp_path: Path) -> None:
    """A run resumed from an earlier step saves a checkpoint-N that exists: its old marker goes before any new file
    (a save cut short then leaves a half-written folder, not new files under the old marker); and the rotation after
    that save never deletes it, though older whole checkpoints of higher steps lie beside it."""
    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        whole_checkpoints_module.write_marker(run / f"checkpoint-{step}", step, 1)
    whole_checkpoints_module.unmark(run / "checkpoint-4")
    assert whole_checkpoints(run) == [run / "checkpoint-2", run / "checkpoint-6"]
    whole_checkpoints_module.write_marker(run / "checkpoint-4", 4, 1)  # saved again, whole
    rotate(run, 1, (None, run / "checkpoint-4"))
    assert whole_checkpoints(run) == [run / "checkpoint-4", run / "checkpoint-6"]


def test_a_resume_with_other_batch_settings_names_them_as_applied_from_the_resumed_step(tmp_path: Path) -> None:
    """The resume line of a recipe edited between starts, read from real TrainingArguments: a new micro-batch and
    accumulation are named as this recipe's from the resumed step, a new learning rate as kept from the optimizer's
    state; an unchanged recipe says nothing."""
    from transformers import TrainingArguments

    def args(**changed: Any) -> Any:
        recipe = {"learning_rate": 1e-4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{**recipe, **changed})

    saved = whole_checkpoints_module.settings(args())
    edited = whole_checkpoints_module.settings(args(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                                                    learning_rate=2e-4))
    folder = tmp_path / "checkpoint-6"
    assert whole_checkpoints_module.differences(folder, saved, saved, 6) is None
    assert whole_checkpoints_module.differences(folder, saved, edited, 6) == (
        f"resume: {folder} was saved with other settings than this recipe's: learning_rate 0.0001 there, 0.0002 here; "
        "per_device_train_batch_size 8 there, 4 here; gradient_accumulation_steps 4 there, 8 here. Kept from the "
        "checkpoint's optimizer state: learning_rate. This recipe's from step 6 on: per_device_train_batch_size, "
        "gradient_accumulation_steps. To go on as the run began, set them back.")


def test_a_resume_on_another_gpu_count_names_the_ranks(tmp_path: Path) -> None:
    """A checkpoint of 8 GPUs resumed on 4 trains on half the samples per step from there on: the line names the ranks
    (the Trainer restores the step silently)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    here = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    on_eight = SimpleNamespace(**{key: getattr(here, key) for key in ("learning_rate", "max_steps")}, world_size=8)
    saved = whole_checkpoints_module.settings(on_eight)
    line = whole_checkpoints_module.differences(tmp_path, saved, whole_checkpoints_module.settings(here), 6)
    assert line is not None and "ranks 8 there, 1 here" in line and "from step 6 on: ranks" in line, line
