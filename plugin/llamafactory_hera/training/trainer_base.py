"""The trainer base every method's trainer class extends, in front of the host's: a run's order in its ``train``,
the checkpoints and the watchdog's sections; a method gives hooks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from typing_extensions import override

from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime import whole_checkpoints as whole
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.training import checkpoints, sections
from llamafactory_hera.training.checkpoint_weights import restored_here


class _RunEnds(TrainerCallback):
    """First of the callbacks: the method's state loaded before the others begin; the end's callbacks watched."""

    def __init__(self, trainer: MethodTrainer) -> None:
        self.trainer = trainer

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.resumed_from is not None:
            self.trainer.load_method_state(self.trainer.resumed_from)

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.stop.stopped:
            save_signal.steps_over()  # SIGTERM from here ends the rank: nothing is left to save on it
        sections.enter("the end of training (its callbacks)", "final")


class MethodTrainer(Trainer):
    """A method's trainer. transformers rotates in its own save, before the marker, counting half-written folders, so
    its copy of the arguments lacks ``save_total_limit``, applied here after each whole save and at the end."""

    checkpoint_limit: int | None  # the recipe's
    resumed_from: str | None = None  # this start's checkpoint
    stop: checkpoints.StopOnSignal  # this start's stop on the save signal
    in_checkpoint: bool = False  # in a checkpoint's save
    lineage: str | None = None  # a pinned resume's, in each marker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_limit = self.args.save_total_limit
        self.args = copy.copy(self.args)  # the recipe's arguments stay as they are
        self.args.save_total_limit = None

    @override
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """What a run does, in order:

        1. :meth:`before_steps`: the method's passes before step 1;
        2. the checkpoint resumed from, chosen whole (a line if it was saved with other settings);
        3. the run's callbacks: the method's state loaded from that checkpoint first, the stop on the save signal, the
           optimizer step's points;
        4. the steps (the host's ``train``), the save signal noted and the model's forwards counted; at their end, with
           no stop taken, SIGTERM its default again (nothing is left for it to save);
        5. :meth:`after_steps`, even after an error or the stop;
        6. the final save's rotation (the best checkpoint alone under ``save_total_limit: 1``), or the stop's line and
           exit;
        7. :meth:`finish_run`: the method's work after steps that ran to their end.
        """
        self.before_steps()
        try:
            self.args.save_total_limit = None  # the steps' rotation is this class's
            main = self.is_world_process_zero()
            resume = checkpoints.whole_resume(self.args.output_dir, resume_from_checkpoint, main)
            self.resumed_from = resume.folder
            self.lineage = resume.lineage
            if self.resumed_from:
                checkpoints.say_other_settings(Path(self.resumed_from), self.args)
            self.stop = checkpoints.StopOnSignal(save_signal.noted_name() or "none", self.args.output_dir)
            self.add_callback(self.stop)
            self.add_callback(sections.OptimizerPoints())  # after the method's callbacks: their collectives first
            self.callback_handler.callbacks.insert(0, _RunEnds(self))
            with save_signal.noting(self.stop.name, steps=True), sections.counting_forwards(self.model):
                result = super().train(self.resumed_from, *args, **kwargs)
        finally:
            self.after_steps()
        # the final training_args.bin and the callbacks see the recipe's limit
        self.args.save_total_limit = self.checkpoint_limit
        sections.enter("the end of the run (final save)", "final")
        if self.stop.stopped:
            checkpoints.stop_and_exit(self.args, self.state.global_step, self.stop.name)
        checkpoints.keep_the_best_alone(self.args, self.state.best_model_checkpoint, self.checkpoint_limit)
        self.finish_run()
        return result

    def before_steps(self) -> None:
        """The method's passes before step 1."""

    def after_steps(self) -> None:
        """After the steps, even when they failed or stopped."""

    def method_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The method's loss, as ``compute_loss`` returns it."""
        return self.host_loss(model, inputs, return_outputs, num_items_in_batch)

    def method_logs(self, logs: dict[str, float]) -> None:
        """The method's values added to a training log (every rank logs at the same step: a reduction is safe)."""

    def save_method_state(self, folder: str, checkpoint: bool) -> None:
        """The method's own state, saved into ``folder`` on every rank: a checkpoint's or the final model's."""

    def load_method_state(self, folder: str) -> None:
        """The method's own state, loaded from the resumed checkpoint on every rank before the first step."""

    def finish_run(self) -> None:
        """After steps that ran to their end, the model at hand."""

    @override
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """:meth:`method_loss` between the micro-step's points (the forward begun before DDP's buffer broadcast)."""
        sections.reached(sections.FORWARD)
        result = self.method_loss(model, inputs, return_outputs, num_items_in_batch)
        sections.loss_returned(result)
        return result

    def host_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    @override
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log
            self.method_logs(logs)
        super().log(logs, *args, **kwargs)

    @override
    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Every forward is progress (generate's too, which no hook on the model sees)."""
        if self.is_in_train:
            with sections.counting_every_forward():
                return super().evaluate(*args, **kwargs)
        with sections.section("the evaluation (do_eval)", "final", forwards=True):
            return super().evaluate(*args, **kwargs)

    @override
    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with sections.section("the prediction (do_predict)", "final", forwards=True):
            return super().predict(*args, **kwargs)

    @override
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # with the model: a checkpoint's state is in it before transformers pushes it (hub_strategy: checkpoint)
        self.save_method_state(output_dir or self.args.output_dir, checkpoint=self.in_checkpoint)
        sections.progress()  # in a checkpoint's save: one of its stages done

    # the Trainer's private methods below have no public hook: a test fails when transformers renames one
    @override
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Private: the one place a checkpoint is written."""
        args = self.args
        run = Path(self._get_output_dir(trial=trial))
        folder = run / f"{whole.CHECKPOINT_PREFIX}{self.state.global_step}"
        about = {whole.SETTINGS: whole.settings(args)}
        if self.lineage:
            about[whole.LINEAGE] = self.lineage
        # each stage done is progress, and so are its files growing
        with sections.section(f"the save of {folder.name}", "save", files=str(folder)):
            try:
                whole.unmark(folder)  # by every rank, before its own writes
                self.in_checkpoint = True  # its save_model saves the method's state with the model
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self.in_checkpoint = False
                sections.progress()
                whole.make_durable(folder)  # this rank's files, before the ranks agree
                sections.progress()
                checkpoints.every_rank_saved(args.device)
                if args.should_save:
                    whole.write_marker(folder, self.state.global_step, args.world_size, about)
            except Exception as error:
                # said by this rank alone: under FSDP2 and ZeRO-3 the others may be in the save's gathers, which a
                # collective here would not match (a hang); the launcher ends them when this process ends
                line = checkpoints.full_line(folder, run, error)
                raise (RecipeError(line) if line else error) from None
            if args.should_save:
                with sections.writing(str(run)):  # the rotation, in the save: the folders going is progress
                    whole.rotate(run, self.checkpoint_limit, (self.state.best_model_checkpoint, folder))

    @override
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Private: CPU DDP ranks need the optimizer loaded onto ``cpu``."""
        if not checkpoints.load_optimizer_on_cpu(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Private: the resumed weights, restored under the model's names."""
        if not restored_here(self, resume_from_checkpoint, self.model if model is None else model, adapters=True):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    @override
    def _load_best_model(self) -> None:
        """Private: the best checkpoint's load, restored under the model's names (the step's bound is no load's)."""
        sections.enter("the load of the best checkpoint", "final")
        folder = self.state.best_model_checkpoint
        if folder is None or not restored_here(self, folder, self.model, adapters=False):
            super()._load_best_model()

    @override
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """Private, transformers 5: no steps at ``max_steps``, so a run resumed from its last checkpoint (killed in its
        final save) saves the final model from it, not a step past it."""
        if self.state.global_step >= self.state.max_steps > 0:
            return None
        return super()._run_epoch(*args, **kwargs)
