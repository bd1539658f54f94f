"""The trainer base's checkpoints (``training/trainer_base.py``, ``training/checkpoints.py``) on a tiny transformers
``Trainer`` in this process (no LLaMA-Factory, no launch): the
signal stop's agreed step on ranks that learn of it a step apart, the stop's checkpoint kept from transformers' rotation
after the stop, its line naming the signal that came, and the optimizer resumed on a CPU rank (``cpu:0``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_whole_checkpoints import _SignalAt
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from typing_extensions import override

from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime import whole_checkpoints as whole_checkpoints_module
from llamafactory_hera.runtime.whole_checkpoints import MARKER, whole_checkpoints
from llamafactory_hera.training import checkpoints, sections
from llamafactory_hera.training.checkpoints import StopOnSignal
from llamafactory_hera.training.sections import SectionKind, Where
from llamafactory_hera.training.trainer_base import MethodTrainer


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


class _Trainer(MethodTrainer):
    """A plugin trainer, as the methods' workflows build one: its save signal is the one its stage notes (here the
    test's ``save_signal.noting``)."""


def _trainer(out: Path, **keys: Any) -> _Trainer:
    torch.manual_seed(0)
    rows = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(str(out), per_device_train_batch_size=2, learning_rate=0.1, save_strategy="steps",
                             save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, **keys)
    return _Trainer(model=_Tiny(), args=args, train_dataset=rows, eval_dataset=rows[:2])


def test_a_signal_stop_keeps_its_checkpoint_whatever_the_best_model_and_the_limit(tmp_path: Path) -> None:
    """With load_best_model_at_end and save_total_limit: 1, transformers' _finalize_training deletes every checkpoint
    but the best after the stop; the one the stop saved (and said it saved) stays."""
    trainer = _trainer(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=True, save_total_limit=1)  # best: an early one
    trainer.add_callback(_SignalAt(3))
    with save_signal.noting("sigterm"), pytest.raises(SystemExit) as stop:  # the stage's save signal, as it notes it
        trainer.train()
    assert stop.value.code == 0 and trainer.state.global_step == 3
    best = Path(trainer.state.best_model_checkpoint)
    assert best != tmp_path / "checkpoint-3"
    assert whole_checkpoints(tmp_path) == sorted([best, tmp_path / "checkpoint-3"])


def test_two_ranks_learning_of_the_stop_a_step_apart_stop_at_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank notes the signal at step 2 and writes the stop step at its end; the other ran step 2's end before that
    write (lockstep lets it be one step ahead, never more) and reads the key at step 3's end: both stop at step 3."""
    store = dist.HashStore()
    monkeypatch.setattr(checkpoints.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoints.dist.distributed_c10d, "_get_default_store", lambda: store)
    ranks = [StopOnSignal("sigterm", "/out"), StopOnSignal("sigterm", "/out")]
    stopped: dict[int, int] = {}
    for step in range(1, 6):
        state = type("State", (), {"global_step": step, "max_steps": 10})()
        if step == 2:
            ranks[0].noted = lambda: True  # this rank's process noted the signal
        for rank in (1, 0):  # rank 1 ends each step first
            control = type("Control", (), {"should_save": False, "should_training_stop": False})()
            ranks[rank].on_step_end(None, state, control)
            if control.should_training_stop:
                stopped.setdefault(rank, step)
    assert stopped == {0: 3, 1: 3}


def test_a_cpu_rank_resumes_the_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DDP run's CPU rank: transformers loads the optimizer with map_location=args.device, cpu:0, which torch
    refuses; the plugin's trainer loads it onto cpu, leaving torch.load as it was."""
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert (tmp_path / "checkpoint-2" / MARKER).is_file()
    trainer.optimizer.state.clear()
    load = torch.load
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("cpu", 0)))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    trainer._load_optimizer_and_scheduler(str(tmp_path / "checkpoint-2"))
    restored = trainer.optimizer.state_dict()["state"]
    assert restored.keys() == saved["state"].keys() and all(
        torch.equal(restored[k]["exp_avg"], saved["state"][k]["exp_avg"]) for k in restored)
    assert torch.load is load


def test_each_rank_makes_its_files_durable_before_the_ranks_agree(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file this rank's save wrote is fsynced by this rank before the agreement that lets rank 0 mark the folder
    whole (on a file system shared across nodes, rank 0's fsync would not flush another node's writes)."""
    synced: list[Path] = []
    agreed: list[set[Path]] = []
    fsync = whole_checkpoints_module._fsync
    monkeypatch.setattr(whole_checkpoints_module, "_fsync", lambda path: (synced.append(path), fsync(path)))
    monkeypatch.setattr(checkpoints, "every_rank_saved", lambda device: agreed.append(set(synced)))
    _trainer(tmp_path, max_steps=1).train()
    files = {path for path in (tmp_path / "checkpoint-1").rglob("*") if path.name != MARKER}
    assert len(agreed) == 1 and "optimizer.pt" in {path.name for path in files} and files <= agreed[0]


class _Recorder:
    """A watchdog as ``training/sections.py`` sees one: each section entered, with the progress made in the one it
    left."""

    def __init__(self) -> None:
        self.state = Where("loading", SectionKind.LOADING, 0)
        self.count = 0
        self.entered = []

    def enter(self, section: str, kind: str, step: int | None = None) -> None:
        self.entered.append((*self.state, self.count))
        self.state = Where(section, kind, self.state.step if step is None else step)
        self.count = 0

    def progress(self) -> None:
        self.count += 1

    def reached(self, point: str) -> None:
        self.count += 1

    def where(self) -> Where:
        return self.state


def test_a_step_is_watched_under_its_own_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """As step N begins (``global_step`` N - 1), the watchdog's section is ``step N``: the number its line names is
    the step the rank is in, as the Trainer's logs count it."""
    dog = _Recorder()
    monkeypatch.setattr(sections, "_running", [dog])
    for done in (0, 3):
        StopOnSignal("sigterm", "/out").on_step_begin(None, type("State", (), {"global_step": done})(), None)
        assert dog.where() == (f"step {done + 1}", "step", done + 1)


def test_a_checkpoint_saved_again_after_a_rollback_is_unmarked_before_its_first_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed from checkpoint-1 (a rollback), the run saves checkpoint-2 again: its old marker is gone before the save
    writes into it, so a save cut short (here at its first ``torch.save``, after the new weights) leaves checkpoint-2
    half-written. Before, it kept its old marker, and the new weights beside the old optimizer and RNG state were
    taken for whole. Saved again in full under ``save_total_limit: 1``, the rotation after it keeps it, though the
    older checkpoint-3 lies beyond it (before, it deleted the checkpoint just saved)."""
    _trainer(tmp_path, max_steps=3).train()
    assert whole_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{step}" for step in (1, 2, 3)]
    save, seen = torch.save, []

    def cut_short(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        seen.append((tmp_path / "checkpoint-2" / MARKER).exists())
        raise OSError("the save was cut short")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="cut short"):
        _trainer(tmp_path, max_steps=2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    monkeypatch.setattr(torch, "save", save)
    assert seen[:1] == [False] and whole_checkpoints(tmp_path) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-3"]
    _trainer(tmp_path, max_steps=2, save_total_limit=1).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert whole_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"]



def test_the_final_model_keeps_the_recipes_save_total_limit(tmp_path: Path) -> None:
    """The Trainer rotates nothing itself during the steps (its copy of the arguments has no limit; the plugin rotates
    whole checkpoints only), and after them its arguments hold the recipe's limit again: the final model's
    training_args.bin says save_total_limit 1, not None."""
    trainer = _trainer(tmp_path, max_steps=2, save_total_limit=1)
    recipe_args = trainer.checkpoint_limit
    trainer.train()
    assert whole_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    trainer.save_model(str(tmp_path / "final"))
    saved = torch.load(tmp_path / "final" / "training_args.bin", weights_only=False)
    assert saved.save_total_limit == recipe_args == 1

def test_each_save_is_watched_as_a_save_and_the_end_of_the_run_as_the_final_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One step of a real Trainer and its checkpoint: the sections a watchdog is told, in order, with the progress
    in each. A step of one micro-batch counts eight times (its loss begun, the model's forward begun and done, its loss
    returned, its backward begun and ended, the optimizer step begun and ended); a
    checkpoint's save is a ``save`` (its bound is a save's, not a step's), each of its stages a unit of progress;
    after the steps the rank is in the final save's own section (``final``: its own bound)."""
    dog = _Recorder()
    monkeypatch.setattr(sections, "_running", [dog])
    _trainer(tmp_path, max_steps=1).train()
    assert dog.entered[1:] == [("step 1", "step", 1, 8), ("the save of checkpoint-1", "save", 1, 3),
                               ("step 1", "step", 1, 0), ("the end of training (its callbacks)", "final", 1, 0)]
    assert dog.where() == ("the end of the run (final save)", "final", 1)


class _OtherSignalAt(TrainerCallback):
    """The job's other warning signal, as step 2 begins."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == 2:
            save_signal._note_other(signal.SIGUSR1, None)


def test_the_stop_in_the_steps_names_the_signal_that_came(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``hera_save_on_signal: sigusr2`` in a job that signals SIGUSR1: the stop's line names SIGUSR1, the one that
    came (the job's log shows what the scheduler sent)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.add_callback(_OtherSignalAt())
    with save_signal.noting("sigusr2", key="hera_save_on_signal"), pytest.raises(SystemExit) as stop:
        trainer.train()
    said = [line for line in capsys.readouterr().out.splitlines() if "SIGUSR1: " in line]
    assert stop.value.code == 0 and said == [
        f"[llamafactory-hera] SIGUSR1: saved the whole checkpoint {tmp_path}/checkpoint-2 and stopped; to go on, run "
        "the same command again."]


def test_the_private_methods_a_plugin_trainer_overrides_are_the_trainers() -> None:
    """Each private method of transformers' Trainer that the trainer base or a method's step overrides (marked
    ``@override``) is still the Trainer's: renamed by transformers, this fails before the override silently stops
    running. ``_run_epoch`` is transformers 5's alone."""
    import transformers

    from llamafactory_hera.harc.trainer import HarcTrainerMixin
    from llamafactory_hera.hera.trainer import HeraTrainer

    classes = (MethodTrainer, HeraTrainer, HarcTrainerMixin)
    private = sorted({name for cls in classes for name, value in vars(cls).items()
                      if name.startswith("_") and not name.startswith("__") and getattr(value, "__override__", False)})
    assert private == ["_load_best_model", "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_prepare_inputs",
                       "_run_epoch", "_save_checkpoint"]
    five = int(transformers.__version__.split(".")[0]) >= 5
    assert [name for name in private if not hasattr(transformers.Trainer, name)] == ([] if five else ["_run_epoch"])


class _StateTrainer(_Trainer):
    """A method's trainer saving its state beside the model, as HeRA's ``hera_state.json``."""

    @override
    def save_method_state(self, folder: str, checkpoint: bool) -> None:
        (Path(folder) / ("method_checkpoint.json" if checkpoint else "method_final.json")).write_text("{}")


def test_the_methods_state_is_in_a_checkpoint_before_transformers_pushes_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``push_to_hub`` with ``hub_strategy: checkpoint`` uploads the folder within transformers' save: the method's
    state must be there by then, or a resume from the hub's ``last-checkpoint`` misses it."""
    seen: list[list[str]] = []
    monkeypatch.setattr(_StateTrainer, "_push_from_checkpoint",
                        lambda self, folder: seen.append(sorted(path.name for path in Path(folder).iterdir())),
                        raising=False)
    torch.manual_seed(0)
    rows = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
                             max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = _StateTrainer(model=_Tiny(), args=args, train_dataset=rows)
    trainer.args.push_to_hub = True  # after the Trainer's start, which would make the hub's repository; push stubbed
    monkeypatch.setattr(_StateTrainer, "_finish_current_push", lambda self: None, raising=False)
    trainer.train()
    assert seen and "method_checkpoint.json" in seen[0] and "method_final.json" not in seen[0]
    trainer.args.push_to_hub = False  # the final save's own push is the host's
    trainer.save_model()
    assert (tmp_path / "method_final.json").exists()
