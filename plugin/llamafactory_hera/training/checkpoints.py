"""A plugin run's checkpoints: the mixin every method's workflow puts in front of the host's trainer. Checkpoints a run
can trust, and a signal stop that saves one (docs/hera.md, "Killed, preempted, disk full"); the ranks agree on the stop
step through their watchdog's beats, else the process group's store (host-side: no device sync).
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from typing_extensions import override

from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime import whole_checkpoints as whole
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say_on_each_node, say_once
from llamafactory_hera.training import sections

# steps from a rank noting the signal to the stop: in lockstep (a collective a step), a rank past step s's end waits
# in s + 1 for the rank that wrote the key at s's end, and sees it at s + 1's end
STOP_MARGIN = 1


class _StopOnSignal(TrainerCallback):
    """Notes the signal; at each step's end sets the agreed stop step, and there asks to save and stop."""

    def __init__(self, name: str, output_dir: str) -> None:
        self.signum = getattr(signal, name.upper(), None)
        self.name = name.upper()
        self.key = f"llamafactory_hera_stop:{output_dir}"
        self.stop_step: int | None = None
        self.stopped = False
        self.noted = save_signal.received  # noted since the stage started
        # the ranks' watchdog (not ft_launcher's) agrees on the stop step through its beats, else the store each step
        self.agreeing = next((dog.stopping for dog in sections._running if hasattr(dog, "stopping")), None)

    @override
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sections.enter(f"step {state.global_step + 1}", "step", state.global_step + 1)

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        received = self.noted()
        if self.stop_step is None and received and not dist.is_initialized():
            self.stop_step = state.global_step
        elif self.stop_step is None and self.signum is not None and self.agreeing is not None:
            self.stop_step = self.agreeing.noted(state.global_step, received)
        elif self.stop_step is None and self.signum is not None and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()  # torchrun's TCPStore: host-side, no device sync
            if received:  # the first rank to write sets the step for all
                store.compare_set(self.key, "", str(state.global_step + STOP_MARGIN))
            if store.check([self.key]):
                self.stop_step = int(store.get(self.key))
        if self.stop_step is not None and self.stop_step <= state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = self.stopped = True


class _EndOfTraining(TrainerCallback):
    """First of the callbacks: the end of training's callbacks (uploads among them) run in a watched section."""

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sections.enter("the end of training (its callbacks)", "final")


class WholeCheckpoints(Trainer):
    """A ``Trainer`` whose checkpoints are whole or known half-written, which stops on the save signal with one, and
    rotates only whole ones: transformers rotates in its own save, before the marker, counting half-written folders, so
    its copy of the arguments lacks ``save_total_limit``, applied here after each whole save and at the end."""

    checkpoint_limit: int | None  # the recipe's
    resumed_from: str | None = None  # this start's checkpoint
    stop: _StopOnSignal  # this start's stop on the save signal
    lineage: str | None = None  # a pinned resume's, in each marker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_limit = self.args.save_total_limit
        self.args = copy.copy(self.args)  # the recipe's arguments stay as they are
        self.args.save_total_limit = None

    @override
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        self.args.save_total_limit = None  # the steps' rotation is this class's
        self.resumed_from = self._whole_resume(resume_from_checkpoint)
        if self.resumed_from:
            self._say_other_settings(Path(self.resumed_from))
        # the stage's save signal, noted since the stage started
        self.stop = stop = _StopOnSignal(save_signal.noted_name() or "none", self.args.output_dir)
        self.add_callback(stop)
        self.callback_handler.callbacks.insert(0, _EndOfTraining())
        with save_signal.noting(stop.name, steps=True), sections.counting_forwards(self.model):
            result = super().train(self.resumed_from, *args, **kwargs)
        # the final training_args.bin and the callbacks see the recipe's limit
        self.args.save_total_limit = self.checkpoint_limit
        sections.enter("the end of the run (final save)", "final")
        if not stop.stopped:
            self._keep_the_best_alone()
            return result
        moved = (
            " without overwrite_output_dir: true (which moves it aside)"
            if getattr(self.args, "overwrite_output_dir", False)  # LLaMA-Factory's key, not transformers'
            else ""
        )
        say_on_each_node(
            f"{save_signal.came() or stop.name}: saved the whole checkpoint {self.args.output_dir}/checkpoint-"
            f"{self.state.global_step} and stopped; to go on, {save_signal.RERUN}{moved}."
        )
        if dist.is_initialized():
            with sections.collective("the barrier after the stop's save"):
                dist.barrier()
            dist.destroy_process_group()
        raise SystemExit(0)

    def _keep_the_best_alone(self) -> None:
        """transformers' end-of-run rule its argument copy no longer triggers: under ``save_total_limit: 1`` with a best
        checkpoint, every other one goes (not after a signal stop)."""
        best = self.state.best_model_checkpoint
        if not self.args.should_save or best is None or self.checkpoint_limit != 1:
            return
        with sections.writing(self.args.output_dir):  # the folders going is progress
            for folder in whole.checkpoint_folders(Path(self.args.output_dir)):
                if not os.path.samefile(folder, best):
                    whole.unmark(folder)  # a kill amid deletion leaves it half-written
                    shutil.rmtree(folder, ignore_errors=True)

    @override
    def _load_best_model(self) -> None:
        """After the last step, in a section of the end of the run (the step's bound is no load's)."""
        sections.enter("the load of the best checkpoint", "final")
        super()._load_best_model()

    @override
    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Every forward is progress (generate's too, which no hook on the model sees): between steps in the step's
        section, after training (``do_eval``) in one of its own."""
        if self.is_in_train:
            with sections.counting_every_forward():
                return super().evaluate(*args, **kwargs)
        with sections.section("the evaluation (do_eval)", "final", forwards=True):
            return super().evaluate(*args, **kwargs)

    @override
    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``do_predict`` (``predict_with_generate``: one forward a token), every forward progress."""
        with sections.section("the prediction (do_predict)", "final", forwards=True):
            return super().predict(*args, **kwargs)

    @override
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """No steps at ``max_steps`` (transformers 5): a run resumed from its last checkpoint (killed in its final save)
        saves the final model from it, not a step past it."""
        if self.state.global_step >= self.state.max_steps > 0:
            return None
        return super()._run_epoch(*args, **kwargs)

    def _whole_resume(self, value: str | bool | None) -> str | None:
        """The checkpoint to resume from: ``value``; for ``true`` or a half-written ``checkpoint-N``, its run's newest
        whole one (saying what it skipped); for a pin taken before, the newest whole one saved since, if any."""
        if not value:
            return None
        if value is True:
            run = Path(self.args.output_dir)
        else:
            since = self._since_pin(value)
            named = Path(value)
            if since is not None:
                return since
            if not named.name.startswith(whole.CHECKPOINT_PREFIX) or named in whole.whole_checkpoints(named.parent):
                return str(value)
            run = named.parent
        newest, half = whole.newest_whole(run)
        if half:
            say_once(
                f"resume: passed over {', '.join(path.name for path in half)} (half-written: a save that did not "
                f"finish on every rank; kept, not deleted); resuming from {newest or 'the start (none whole)'}."
            )
        return str(newest) if newest else None  # none whole: from the start (recipe.resume said so)

    def _since_pin(self, pin: str) -> str | None:
        """The newest whole checkpoint saved since an earlier start took ``pin``, else None (a first start records the
        pin)."""
        out = Path(self.args.output_dir)
        entry = whole.taken(out, pin)
        if entry is None and self.is_world_process_zero():
            entry = whole.take(out, pin)
        self.lineage = entry[whole.LINEAGE] if entry else None
        since = whole.saved_since(out, self.lineage) if self.lineage else []
        if not since:
            return None
        say_once(
            f"resume_from_checkpoint: {pin} was taken when this run started from it ({entry['taken']}); resuming "
            f"from {since[-1]}, the newest whole checkpoint saved since. To start from {pin} again, delete or move "
            f"aside the checkpoints saved since ({', '.join(path.name for path in since)})."
        )
        return str(since[-1])

    def _say_other_settings(self, folder: Path) -> None:
        """One line when the checkpoint was saved with other settings than this run's."""
        marker = whole.read_marker(folder)
        now = whole.settings(self.args)
        line = whole.differences(folder, marker.get(whole.SETTINGS) or {}, now, marker.get("step"))
        if line:
            say_once(line)

    def save_method_state(self, folder: str) -> None:
        """A method's own state, saved into ``folder`` in the whole save (``save_only_model`` too)."""

    @override
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
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
                super()._save_checkpoint(model, trial)
                sections.progress()
                self.save_method_state(str(folder))
                sections.progress()
                whole.make_durable(folder)  # this rank's files, before the ranks agree
                sections.progress()
                _every_rank_saved(args.device)
                if args.should_save:
                    whole.write_marker(folder, self.state.global_step, args.world_size, about)
            except Exception as error:
                # said by this rank alone: under FSDP2 and ZeRO-3 the others may be in the save's gathers, which a
                # collective here would not match (a hang); the launcher ends them when this process ends
                line = _full_line(folder, run, error)
                raise (RecipeError(line) if line else error) from None
            if args.should_save:
                with sections.writing(str(run)):  # the rotation, in the save: the folders going is progress
                    whole.rotate(run, self.checkpoint_limit, (self.state.best_model_checkpoint, folder))

    @override
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """On CPU DDP ranks transformers loads the optimizer onto ``cpu:0``, which torch refuses ("don't know how to
        restore data location"): load onto ``cpu``, as for one process."""
        device = self.args.device
        files = [os.path.join(checkpoint or "", name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        cpu_ranks = device.type == "cpu" and device.index is not None and self.args.world_size > 1
        engine = self.is_deepspeed_enabled or self.is_fsdp_enabled  # they load their own
        if not cpu_ranks or engine or not all(os.path.isfile(path) for path in files):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        self.optimizer.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True))
        with warnings.catch_warnings(record=True) as caught:
            self.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))
        reissue_pt_warnings(caught)


def _every_rank_saved(device: torch.device) -> None:
    """Return once every rank's save returned (a failed rank never arrives and ends its job). The sum is read on the
    host: NCCL only queues the call, and rank 0 would mark and rotate while another rank writes."""
    if dist.is_initialized():
        saved = torch.ones(1, device=device)
        with sections.collective("the all-reduce that agrees every rank saved"):
            dist.all_reduce(saved)
        if round(saved.item()) != dist.get_world_size():  # .item() waits for the all-reduce
            raise RuntimeError(f"checkpoint save: {saved.item():g} of {dist.get_world_size()} ranks saved")


NEARLY_FULL = 64 * 2**20  # free bytes below which a failed save means a full disk


def _full_line(folder: Path, run: Path, error: BaseException) -> str | None:
    """The disk-full line when a save failed for lack of space, else None. Free space is read too: torch.save says only
    ``unexpected pos`` or ``file write failed``."""
    newest = whole.newest_whole(run)[0]
    needed = sum(path.stat().st_size for path in newest.rglob("*") if path.is_file()) if newest else None
    free = shutil.disk_usage(run).free
    if (
        getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT)
        and not any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))
        and free >= (NEARLY_FULL if needed is None else needed)
    ):
        return None
    size = f"it needs about {needed:,} bytes (the size of {newest.name}), " if newest and needed else ""
    kept = f"{newest} is kept, and is what the same command resumes from" if newest else "no whole checkpoint yet"
    why = f"{type(error).__name__}: {(str(error) + chr(10)).splitlines()[0]}"
    return (
        f"disk full: the checkpoint {folder} could not be written ({why}); {size}"
        f"{free:,} bytes are free there. It is not marked whole; {kept}. Free space (or "
        f"set save_total_limit, or another output_dir) and {save_signal.RERUN}."
    )
