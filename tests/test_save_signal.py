"""The save signal's one-line slips a user would meet (llamafactory_hera/runtime/save_signal.py, hera/teacher_run.py,
training/checkpoints.py), without sending a signal: the handlers are called as the signal would call them. The
teacher's distributed pass stops on every rank together; a stage started off the main thread runs unnoted instead of
failing; the job's other warning signal is said once, on each node's first rank; the stop lines name the signal that
came (in the steps: tests/test_checkpoint_trainer.py). What a whole run does on a signal: tests/test_requeue.py."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
import torch

from llamafactory_hera.hera import teacher_run
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.runtime import save_signal

OTHER = "SIGUSR1 came, but hera_save_on_signal is sigusr2"  # the other warning signal's line begins so


def _said(capsys: pytest.CaptureFixture, begins: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"[llamafactory-hera] {begins}")]


@pytest.mark.parametrize(("here", "there", "done"), [
    (False, True, ["pass", "all_reduce", "stopped"]),  # the other rank noted it: this one stops too, before the gather
    (True, False, ["noted", "pass", "all_reduce", "stopped"]),  # noted in the pass: it goes on to the pass's end first
    (False, False, ["pass", "all_reduce", "all_gather"]),
])
def test_the_teachers_pass_stops_on_every_rank_together(here: bool, there: bool, done: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of two in the teacher's precompute; the signal noted on this rank (``here``, within its pass) or on the
    other (``there``). A rank stopping alone would leave the other in the pass's gather for ddp_timeout."""
    events: list[str] = []

    def features(teacher: Any, processor: Any, images: list[Any], batch_size: int, **kwargs: Any) -> torch.Tensor:
        if here:
            save_signal._note(signal.SIGUSR1, None)
            events.append("noted")
        kwargs["keep"](0, torch.zeros(len(images), 2))
        save_signal.stop_before_step("rows kept")  # as the real pass does after each kept batch
        events.append("pass")
        return torch.zeros(len(images), 2)

    def all_reduce(tensor: torch.Tensor) -> None:
        events.append("all_reduce")
        tensor += float(there)

    distributed = teacher_run.torch.distributed
    monkeypatch.setattr(teacher_run, "distributed", lambda: True)
    monkeypatch.setattr(teacher_run, "stored_rows", lambda store, keys: {})
    monkeypatch.setattr(teacher_run, "image_features", features)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "all_gather", lambda gathered, piece: events.append("all_gather"))
    by_key = {f"image{index}": index for index in range(4)}
    with save_signal.noting("sigusr1"):
        try:
            teacher_run.precompute_teacher_features(None, None, by_key, TeacherFeatureCache(), 2, None, False)
        except save_signal.Stopped:
            events.append("stopped")
    assert events == done


def test_a_stage_started_off_the_main_thread_runs_without_noting() -> None:
    """A stage run from another thread (a notebook's, a UI's worker) cannot set a handler: it runs, the signal left as
    it was, instead of failing on ``signal only works in main thread``."""
    found: list[Any] = []

    def stage() -> None:
        try:
            with save_signal.noting("sigusr1"):
                found.append(save_signal.noted_name())
        except ValueError as error:
            found.append(error)

    thread = threading.Thread(target=stage)
    thread.start()
    thread.join()
    assert found == [None]


@pytest.mark.parametrize(("local_rank", "lines"), [("0", 1), ("1", 0)])
def test_the_other_warning_signal_is_said_once_on_each_nodes_first_rank(
        local_rank: str, lines: int, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM signals every process, and again: the line comes once, from each node's first rank; each rank takes it
    for the save signal."""
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with save_signal.noting("sigusr2", key="hera_save_on_signal"):
        save_signal._note_other(signal.SIGUSR1, None)
        save_signal._note_other(signal.SIGUSR1, None)
        assert save_signal.received() and save_signal.came() == "SIGUSR1"
    assert len(_said(capsys, OTHER)) == lines


def test_the_stop_before_step_1_names_the_signal_that_came(capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with save_signal.noting("sigusr2", key="hera_save_on_signal"), pytest.raises(save_signal.Stopped):
        save_signal._note_other(signal.SIGUSR1, None)
        save_signal.stop_before_step("rows kept")
    assert _said(capsys, "SIG") == [
        f"[llamafactory-hera] {OTHER}: the job's signal and the recipe's differ. Taken for SIGUSR2: the run saves and "
        "stops. Make them one: hera_save_on_signal: sigusr1, or the job's --signal=USR2@N.",
        "[llamafactory-hera] SIGUSR1: stopped before step 1, rows kept; to go on, run the same command again: it "
        "starts the run, reusing what was kept."]


def test_sigterm_after_the_last_step_ends_the_rank_at_once() -> None:
    """After the steps nothing is left for a later signal to save: torchrun's SIGTERM gets its default back (noted, it
    would wait for the final save, evaluation or predict, then torchrun's SIGKILL 30 s later). One noted in the last
    steps, too late for a stop, does not end the rank before the final save it asked for."""
    with save_signal.noting("sigterm"), save_signal.noting("sigterm", steps=True):
        save_signal._note(signal.SIGTERM, None)  # in the last step: too late for the agreed stop step
        save_signal.steps_over()  # alive: the final save goes on
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
