"""A run's checkpoints, for the trainer base: the one a start resumes from, chosen whole; a signal stop that saves
one (docs/hera.md, "Killed, preempted, disk full"); a full disk named."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from typing_extensions import override

from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime import whole_checkpoints as whole
from llamafactory_hera.runtime.log import say_on_each_node, say_once
from llamafactory_hera.training import sections

# steps from a rank noting the signal to the stop: in lockstep (a collective a step), a rank past step s's end waits
# in s + 1 for the rank that wrote the key at s's end, and sees it at s + 1's end
STOP_MARGIN = 1


class StopOnSignal(TrainerCallback):
    """At each step's end, the agreed stop step; there, a save and the stop."""

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


@dataclass(frozen=True)
class Resume:
    """The checkpoint a start resumes from (None: the start) and a pinned resume's lineage."""

    folder: str | None
    lineage: str | None = None


def whole_resume(output_dir: str, value: str | bool | None, main: bool) -> Resume:
    """The checkpoint to resume from: ``value``; for ``true`` or a half-written ``checkpoint-N``, its run's newest
    whole one (saying what it skipped); for a pin taken before, the newest whole one saved since, if any (``main``:
    this rank records a first start's pin)."""
    if not value:
        return Resume(None)
    lineage = None
    if value is True:
        run = Path(output_dir)
    else:
        pinned = _since_pin(output_dir, value, main)
        lineage = pinned.lineage
        named = Path(value)
        if pinned.folder is not None:
            return pinned
        if not named.name.startswith(whole.CHECKPOINT_PREFIX) or named in whole.whole_checkpoints(named.parent):
            return Resume(str(value), lineage)
        run = named.parent
    newest, half = whole.newest_whole(run)
    if half:
        say_once(
            f"resume: passed over {', '.join(path.name for path in half)} (half-written: a save that did not "
            f"finish on every rank; kept, not deleted); resuming from {newest or 'the start (none whole)'}."
        )
    return Resume(str(newest) if newest else None, lineage)  # none whole: from the start (recipe.resume said so)


def _since_pin(output_dir: str, pin: str, main: bool) -> Resume:
    """The newest whole checkpoint saved since an earlier start took ``pin`` (else None), with the pin's lineage."""
    out = Path(output_dir)
    entry = whole.taken(out, pin)
    if entry is None and main:
        entry = whole.take(out, pin)
    lineage = entry[whole.LINEAGE] if entry else None
    since = whole.saved_since(out, lineage) if lineage else []
    if not since:
        return Resume(None, lineage)
    say_once(
        f"resume_from_checkpoint: {pin} was taken when this run started from it ({entry['taken']}); resuming "
        f"from {since[-1]}, the newest whole checkpoint saved since. To start from {pin} again, delete or move "
        f"aside the checkpoints saved since ({', '.join(path.name for path in since)})."
    )
    return Resume(str(since[-1]), lineage)


def say_other_settings(folder: Path, args: Any) -> None:
    marker = whole.read_marker(folder)
    line = whole.differences(folder, marker.get(whole.SETTINGS) or {}, whole.settings(args), marker.get("step"))
    if line:
        say_once(line)


def keep_the_best_alone(args: Any, best: str | None, limit: int | None) -> None:
    """transformers' end-of-run rule its argument copy no longer triggers: under ``save_total_limit: 1`` with a best
    checkpoint, every other one goes (not after a signal stop)."""
    if not args.should_save or best is None or limit != 1:
        return
    with sections.writing(args.output_dir):  # the folders going is progress
        for folder in whole.checkpoint_folders(Path(args.output_dir)):
            if not os.path.samefile(folder, best):
                whole.unmark(folder)  # a kill amid deletion leaves it half-written
                shutil.rmtree(folder, ignore_errors=True)


def stop_and_exit(args: Any, step: int, name: str) -> NoReturn:
    """After the stop's save: its line, the ranks' last barrier, exit 0 (the launcher's requeue resumes)."""
    moved = (
        " without overwrite_output_dir: true (which moves it aside)"
        if getattr(args, "overwrite_output_dir", False)  # LLaMA-Factory's key, not transformers'
        else ""
    )
    say_on_each_node(
        f"{save_signal.came() or name}: saved the whole checkpoint {args.output_dir}/checkpoint-{step} and stopped; "
        f"to go on, {save_signal.RERUN}{moved}."
    )
    if dist.is_initialized():
        with sections.collective("the barrier after the stop's save"):
            dist.barrier()
        dist.destroy_process_group()
    raise SystemExit(0)


def load_optimizer_on_cpu(trainer: Any, checkpoint: str | None) -> bool:
    """On CPU DDP ranks transformers loads the optimizer onto ``cpu:0``, which torch refuses ("don't know how to
    restore data location"): load onto ``cpu``, as for one process. False: the Trainer's load is right."""
    device = trainer.args.device
    files = [os.path.join(checkpoint or "", name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
    cpu_ranks = device.type == "cpu" and device.index is not None and trainer.args.world_size > 1
    engine = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled  # they load their own
    if not cpu_ranks or engine or not all(os.path.isfile(path) for path in files):
        return False
    trainer.optimizer.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True))
    with warnings.catch_warnings(record=True) as caught:
        trainer.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))
    reissue_pt_warnings(caught)
    return True


def every_rank_saved(device: torch.device) -> None:
    """Return once every rank's save returned. The sum is read on the host: NCCL only queues the call, and rank 0
    would mark and rotate while another rank writes."""
    if dist.is_initialized():
        saved = torch.ones(1, device=device)
        with sections.collective("the all-reduce that agrees every rank saved"):
            dist.all_reduce(saved)
        if round(saved.item()) != dist.get_world_size():  # .item() waits for the all-reduce
            raise RuntimeError(f"checkpoint save: {saved.item():g} of {dist.get_world_size()} ranks saved")


NEARLY_FULL = 64 * 2**20  # free bytes below which a failed save means a full disk


def full_line(folder: Path, run: Path, error: BaseException) -> str | None:
    """The disk-full line, else None. Free space is read too: torch.save says only ``unexpected pos`` or ``file write
    failed``."""
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
