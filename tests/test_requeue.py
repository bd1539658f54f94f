"""One command, every requeue: a preemptible queue reruns the very same command, and it continues the run from
wherever it was (runtime/save_signal.py, recipe/resume.py, runtime/output_dir.py, training/checkpoints.py).

Every run in this process through LLaMA-Factory's ``run_exp`` (tests/conftest.py's ``run_train``) on the tiny
Qwen2.5-VL, HeRA with LoRA. A signal is sent by the process to itself from inside a phase (the teacher's forward, the
model's load); while a test runs, a signal the run does not handle raises :class:`Unhandled` instead of its default
(which would end pytest), so that a run without the early handler fails the test instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_recipe, run_train
from llamafactory_hera.hera import teacher as teacher_module
from llamafactory_hera.hera import teacher_run
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.hera.selection import auto
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours
from llamafactory_hera.hera.teacher import VisionTeacher
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.run_record import RUN_RECORD
from llamafactory_hera.runtime.whole_checkpoints import checkpoint_folders

ONE_STEP = {"per_device_train_batch_size": 4, "max_samples": 16, "max_steps": 1, "save_strategy": "steps",
            "save_steps": 1, "hera_monitor_steps": 0, "hera_teacher_precompute": "false",
            "overwrite_output_dir": None}  # the shipped recipes' way: no overwrite_output_dir


class Unhandled(Exception):
    """A signal left to the handler the test set (without the plugin's: the signal's default, the process ends)."""


@contextlib.contextmanager
def signals_raise(*signums: int) -> Iterator[None]:
    def raised(signum: int, frame: Any) -> None:
        raise Unhandled(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, raised) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_at(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, signum: int, call: int = 1) -> None:
    """``owner.name`` sends ``signum`` to this process as its call number ``call`` begins."""
    original, calls = getattr(owner, name), []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def lines(proc: Any, text: str) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if text in line]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, copied out of the file (load_file maps it: a file torn afterwards changes them)."""
    return {name: tensor.clone() for name, tensor in load_file(folder / "adapter_model.safetensors").items()}


def test_a_stop_in_the_teachers_pass_and_the_stop_lines_command_start_the_run(assets, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM in the teacher's pass before step 1 (batches of 4 rows, each kept): the run stops after the batch in
    flight with one line and exit 0, no checkpoint. Before: the signal's default ended the process there, and the
    rerun with resume_from_checkpoint: true (what the step-time stop line told users) was refused: "there is nothing
    to resume". Now that rerun says it starts the run in one line, reuses the kept rows, and ends with the adapter of
    a run never stopped."""
    monkeypatch.setattr(teacher_module, "KEEP_ROWS", 4)
    monkeypatch.setattr(teacher_run, "teacher_batch_size", lambda batch_size: 4)
    out, whole = tmp_path / "run" / "out", tmp_path / "whole" / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "hera_teacher_precompute": "true"})
    with monkeypatch.context() as patched, signals_raise(signal.SIGTERM):
        signal_at(patched, VisionTeacher, "forward", signal.SIGTERM, call=2)
        proc = run_train(recipe, tmp_path / "run", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "stopped before step 1") == [
        "[llamafactory-hera] SIGTERM: stopped before step 1, the teacher features computed so far kept in its store; "
        "to go on, run the same command again: it starts the run, reusing what was kept."]
    assert not checkpoint_folders(out) and (out / RUN_RECORD).is_file()
    proc = run_train({**recipe, "resume_from_checkpoint": True}, tmp_path / "again")
    assert lines(proc, "resume_from_checkpoint: true: ") == [
        f"[llamafactory-hera] resume_from_checkpoint: true: output_dir: {out} holds no whole checkpoint of its run "
        "yet (stopped before one): starting the run, reusing what its passes before step 1 kept."]
    assert lines(proc, "continuing from 8 of "), proc.stdout[-3000:]
    run_train({**recipe, "output_dir": str(whole)}, tmp_path / "whole")
    got, want = adapter(out), adapter(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


def test_a_signal_while_the_model_loads_stops_at_step_1_and_the_same_command_goes_on(
        assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 (hera_save_on_signal: sigusr1) while LLaMA-Factory loads the model, before the Trainer exists. Before:
    no handler yet, the signal's default ended the process (under a launcher: ignored, and the stop dropped). Now it
    is noted from the stage's start, and the step-time stop takes it: a whole checkpoint-1 and the stop line; the
    same command again resumes from it and ends at max_steps."""
    import llamafactory.train.sft.workflow as workflow  # here: importing llamafactory costs seconds

    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "max_steps": 2, "hera_save_on_signal": "sigusr1"})
    with monkeypatch.context() as patched, signals_raise(signal.SIGUSR1):
        signal_at(patched, workflow, "load_model", signal.SIGUSR1)
        proc = run_train(recipe, tmp_path / "run", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "SIGUSR1: saved") == [
        f"[llamafactory-hera] SIGUSR1: saved the whole checkpoint {out}/checkpoint-1 and stopped; to go on, run the "
        "same command again."]
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "stopped"  # not failed: exit 0, resumable
    proc = run_train(recipe, tmp_path / "again")
    assert lines(proc, f"Resuming training from {out / 'checkpoint-1'}")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"


def test_a_run_killed_in_its_final_save_writes_its_final_model_again(assets, tmp_path: Path) -> None:
    """What a kill inside the end-of-run save leaves: the final adapter half-written, checkpoint-2 whole, the record
    ``running``. Before: the same command was refused as "a finished run" (the adapter's file was the evidence),
    advising "resume_from_checkpoint: True (one of its checkpoints)". Now the record decides: the run resumes from
    checkpoint-2 and writes the final adapter again, equal to the one the kill tore; once finished, the same command
    with resume_from_checkpoint: true is refused as finished, naming a real checkpoint."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "max_steps": 2})
    run_train(recipe, tmp_path / "first")
    final, state = adapter(out), (out / "hera_state.json").read_text()
    torn = out / "adapter_model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    for name in ("trainer_state.json", "train_results.json", "all_results.json"):
        (out / name).unlink(missing_ok=True)
    record = json.loads((out / RUN_RECORD).read_text())
    (out / RUN_RECORD).write_text(json.dumps({**record, "status": "running"}))
    proc = run_train(recipe, tmp_path / "again")
    assert lines(proc, f"Resuming training from {out / 'checkpoint-2'}"), proc.stdout[-3000:]
    again = adapter(out)
    assert again.keys() == final.keys() and all(torch.equal(again[key], final[key]) for key in final)
    assert (out / "hera_state.json").read_text() == state  # HeRA's temperature, from checkpoint-2
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"
    proc = run_train({**recipe, "resume_from_checkpoint": True}, tmp_path / "finished", check=False)
    assert proc.returncode == 1
    [line] = lines(proc, "error: ")
    assert line.startswith(f"[llamafactory-hera] error: output_dir: {out} holds a finished run ({RUN_RECORD} says "
                           "finished); ")
    assert f"resume_from_checkpoint: {out}/checkpoint-2 (one of its checkpoints)" in line, line


def test_a_stop_in_head_selection_keeps_the_batches_it_finished(assets, tmp_path: Path) -> None:
    """Head selection's language-model pass (12 pairs, batches of 4) with the save signal noted after its first
    batch: it stops after keeping that batch (one line, exit 0), and the rerun continues from it."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    options = SelectionOptions(num_samples=12, k=5, teacher=str(assets.teacher), device="cpu", progress=False,
                               batch_size=4)
    pairs, _ = prepare(recipe_args, options)
    kept = tmp_path / "kept"
    # the selection's pass notes SIGTERM (auto.resolve_auto_heads): the stage leaves it its default until then
    with signals_raise(signal.SIGTERM), save_signal.noting("sigterm"), save_signal.keeping():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(save_signal.Stopped) as stopped:
            score_head_neighbours(recipe_args, options, pairs, kept)
    assert stopped.value.code == 0 and sorted(path.name for path in kept.iterdir()) == ["0.pt"]
    assert not save_signal.received()


def test_a_forked_worker_dies_of_the_signal_as_before(tmp_path: Path) -> None:
    """A child forked while the stage notes SIGTERM (a datasets or DataLoader worker) gets the signal's default back:
    a pool's terminate() ends it at once (noted only, the worker would live on and the pool's join hang)."""
    with signals_raise(signal.SIGTERM), save_signal.noting("sigterm"):
        ready, started = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: says it runs, then waits up to 10 s to be terminated
            os.write(started, b"1")
            for _ in range(200):
                time.sleep(0.05)
            os._exit(3)
        os.read(ready, 1)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not save_signal.received()


@pytest.mark.parametrize(("name", "steps"), [("sigusr1", False), ("sigterm", True)])
def test_a_forked_worker_leaves_the_save_signal_to_its_rank(name: str, steps: bool) -> None:
    """A scheduler signals every process of the job (SLURM's --signal, a preemption's SIGTERM): a data worker forked
    while the run notes the save signal (SIGUSR1 from the start; SIGTERM in the steps, where no pool is terminated)
    ignores it and lives on, so the rank saves rather than failing on a worker killed under it."""
    signum = getattr(signal, name.upper())
    with signals_raise(signum), save_signal.noting(name, steps=steps):
        ready, started = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: says it runs, lives 0.5 s, ends with its own code
            os.write(started, b"1")
            time.sleep(0.5)
            os._exit(3)
        os.read(ready, 1)
        os.kill(child, signum)
        _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3


def test_the_ranks_of_a_distributed_pass_stop_together_after_it() -> None:
    """Inside a distributed pass (the teacher's precompute on several ranks) a rank that noted the signal goes on
    to the pass's end, where the ranks agree (an all-reduce of the flag, hera/teacher_run.py): a rank stopping alone
    would leave the others waiting in the pass's gather. Every rank stops on the agreement, signalled or not."""
    with signals_raise(signal.SIGUSR1), save_signal.noting("sigusr1"):
        os.kill(os.getpid(), signal.SIGUSR1)
        with save_signal.deferred():
            save_signal.stop_before_step("rows kept")  # held back: no stop inside the pass
        save_signal.stop_before_step("rows kept", agreed=False)  # no rank noted it: on
        with pytest.raises(save_signal.Stopped):
            save_signal.stop_before_step("rows kept", agreed=True)


def test_the_signals_handler_is_given_back_when_the_stage_ends() -> None:
    """The stage notes the save signal (and the steps again inside it); once the stage's block ends, the handler the
    process had before is back: a signal after the run is the process's own again, not noted by a run that ended."""
    with signals_raise(signal.SIGUSR1):
        before = signal.getsignal(signal.SIGUSR1)
        with save_signal.noting("sigusr1"):
            with save_signal.noting("sigusr1", steps=True):
                assert signal.getsignal(signal.SIGUSR1) is not before
            assert signal.getsignal(signal.SIGUSR1) is not before
        assert signal.getsignal(signal.SIGUSR1) is before
        with pytest.raises(Unhandled):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs in this thread before the sleep ends
    assert not save_signal.received()


@pytest.mark.parametrize("main", [True, False])
def test_a_stop_in_head_selection_stops_every_rank_with_rank_0(main: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 stopped on the save signal inside head selection (its line said): it, and every other rank on the
    broadcast of that, stops with exit 0, instead of taking no heads for a failure."""
    def stopped(*args: Any, **kwargs: Any) -> None:
        raise save_signal.Stopped(0)

    def broadcast(payload: list[Any], src: int) -> None:  # rank 0's payload, as the process group hands it over
        payload[:] = [None, None, None]

    monkeypatch.setattr(auto, "run_selection", stopped)
    monkeypatch.setattr(auto.torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(auto.torch.distributed, "broadcast_object_list", broadcast)
    recipe = SimpleNamespace(data_args=SimpleNamespace(max_samples=None))
    with pytest.raises(save_signal.Stopped) as caught:
        auto.resolve_auto_heads(recipe, parse_hera_arguments({"hera_heads": "auto"}), 0, "cpu", "out", main,
                                dtype="float32")
    assert caught.value.code == 0


def test_the_jobs_other_warning_signal_is_said_and_taken_for_the_save_signal(assets, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``hera_save_on_signal: sigusr2`` in a job that signals SIGUSR1 (an sbatch's ``--signal=USR1@N``). Before: the
    signal's default ended every process of the job, with no save and no line. Now one line names both signals and
    the key, and the run stops as on its save signal: a whole checkpoint, the stop line, exit 0, the record
    ``stopped``."""
    import llamafactory.train.sft.workflow as workflow  # here: importing llamafactory costs seconds

    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "max_steps": 2, "hera_save_on_signal": "sigusr2"})
    with monkeypatch.context() as patched, signals_raise(signal.SIGUSR1, signal.SIGUSR2):
        signal_at(patched, workflow, "load_model", signal.SIGUSR1)
        proc = run_train(recipe, tmp_path / "run", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, " came, but ") == [
        "[llamafactory-hera] SIGUSR1 came, but hera_save_on_signal is sigusr2: the job's signal and the recipe's "
        "differ. Taken for SIGUSR2: the run saves and stops. Make them one: hera_save_on_signal: sigusr1, or the job's "
        "--signal=USR2@N."]
    assert lines(proc, ": saved the whole checkpoint") == [
        f"[llamafactory-hera] SIGUSR1: saved the whole checkpoint {out}/checkpoint-1 and stopped; to go on, run the "
        "same command again."]
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "stopped"


def test_a_pinned_checkpoint_is_taken_once_and_the_same_command_goes_on_from_the_run(
        assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``resume_from_checkpoint: <another run's checkpoint-1>`` kept in the recipe, as a requeue reruns it. Before:
    every start went back to the pin, so the run never got past one preemption. Now the start that takes the pin
    records it; the run stopped at step 2 (SIGTERM), and the same command continues from checkpoint-2, the newest
    whole checkpoint saved since, saying so, and ends as the run never stopped. The pinned run's learning rate differs
    from the checkpoint's, which its optimizer state keeps: named in one line at the resume (before: no word); the
    requeue, resuming its own checkpoint, names nothing."""
    import transformers

    first = tmp_path / "first" / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", first, **{**ONE_STEP, "max_steps": 1}), tmp_path / "first")
    pin = first / "checkpoint-1"
    out, whole = tmp_path / "run" / "out", tmp_path / "whole" / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "max_steps": 3, "learning_rate": 2e-3,
                                                      "resume_from_checkpoint": str(pin)})
    with monkeypatch.context() as patched, signals_raise(signal.SIGTERM):
        signal_at(patched, transformers.Trainer, "training_step", signal.SIGTERM)  # as step 2 begins
        proc = run_train(recipe, tmp_path / "run", check=False)
    assert proc.returncode == 0 and lines(proc, "SIGTERM: saved the whole checkpoint"), proc.stdout[-3000:]
    assert lines(proc, "resume: ") == [
        f"[llamafactory-hera] resume: {pin} was saved with other settings than this recipe's: learning_rate 0.001 "
        "there, 0.002 here; max_steps 1 there, 3 here. Kept from the checkpoint's optimizer state: learning_rate. "
        "This recipe's from step 1 on: max_steps. To go on as the run began, set them back."]
    proc = run_train(recipe, tmp_path / "again")
    [line] = lines(proc, "resume_from_checkpoint: ")
    assert line.startswith(f"[llamafactory-hera] resume_from_checkpoint: {pin} was taken when this run started from "
                           "it (") and line.endswith(
        f"); resuming from {out}/checkpoint-2, the newest whole checkpoint saved since. To start from {pin} again, "
        "delete or move aside the checkpoints saved since (checkpoint-2).")
    assert not lines(proc, "resume: "), proc.stdout[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    run_train({**recipe, "output_dir": str(whole)}, tmp_path / "whole")
    got, want = adapter(out), adapter(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


@pytest.mark.parametrize(("env", "group_rank", "said"), [
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 0, "stop."),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 3, ""),
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 8, "stop. (node HOST)"),  # node 1 of 2
    ({"LOCAL_RANK": "-1"}, 0, "stop."),  # transformers' "not distributed"
    ({}, 0, "stop."),  # a plain process, or ranks no launcher started: rank 0
    ({}, 1, ""),
    ({"LOCAL_RANK": "x"}, 1, ""),
])
def test_a_stop_line_is_said_once_on_each_node(env: dict[str, str], group_rank: int, said: str,
                                               monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """A signal stop's line (``log.say_on_each_node``): by the node's first rank, with its node named in a job of
    several nodes (SLURM's sbatch writes every node into one file), by no other rank."""
    import socket

    import torch.distributed as dist

    from llamafactory_hera.runtime import log

    for key in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LLAMABOARD_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: group_rank)
    monkeypatch.setattr(socket, "gethostname", lambda: "HOST")
    log.say_on_each_node("stop.")
    assert capsys.readouterr().out == (f"{log.PREFIX} {said}\n" if said else "")
