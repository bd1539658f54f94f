"""A killed, preempted or disk-full run loses nothing: resume takes the newest whole checkpoint only
(``lifecycle/whole_checkpoints.py``, ``training/checkpoints.py``).

In-process HeRA runs through LLaMA-Factory's ``run_exp``: a SIGTERM mid-run saves a whole checkpoint and exits 0; a
full disk while the next checkpoint's optimizer is written (after its model files: the shape of a kill inside a save)
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
from llamafactory_hera_patches.lifecycle.whole_checkpoints import MARKER, newest_whole, rotate, whole_checkpoints
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
    # the disk fills while checkpoint-4's optimizer is written, after its adapter
    save = torch.save

    def full_disk(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, printed = _run({**recipe, "resume_from_checkpoint": True}, tmp_path / "run")
    monkeypatch.setattr(torch, "save", save)
    assert code == 1
    assert _line(printed, "error: disk full").startswith(
        f"[llamafactory-hera] error: disk full: the checkpoint {run}/checkpoint-4 could not be written (OSError: "
        f"[Errno 28] No space left on device: '{run}/checkpoint-4/optimizer.pt'); it needs about ")
    assert f"{run}/checkpoint-2 is kept, and is what the same command resumes from" in printed
    assert (run / "checkpoint-4" / "adapter_model.safetensors").is_file()  # half-written, unmarked
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
    """Unmarked folders count by trainer_state.json only in a run where none is marked (written before markers);
    rotation deletes whole ones only, never the newest whole or the best."""
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
    checkpoints._every_rank_saved(torch.device("cpu"))
    monkeypatch.setattr(checkpoints.dist, "all_reduce", lambda tensor: None)  # queued, not summed
    with pytest.raises(RuntimeError, match="1 of 2 ranks saved"):
        checkpoints._every_rank_saved(torch.device("cpu"))


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
        assert checkpoints._lack_of_space(error, tmp_path) is full
