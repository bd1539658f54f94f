"""Checkpoints a run can trust, and a stop that saves one: :class:`WholeCheckpoints`, mixed in front of every method's
Trainer. docs/hera.md ("Killed, preempted, disk full") says what users see.

Each ``checkpoint-N`` is marked whole (``lifecycle.whole_checkpoints``) once every rank's save returned, then rotated;
a save failing for lack of space is one line on every rank, no marker; resume takes the newest whole checkpoint. On
``<prefix>_save_on_signal`` the handler only notes the signal; the ranks agree on one stop step through the process
group's store (host-side: no device sync), save a whole checkpoint there and exit 0.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llamafactory_hera.log import say_once
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches.lifecycle import whole_checkpoints as whole

# steps between a rank noting the signal and the stop: the ranks run in lockstep (a collective every step), so a rank
# past step s's end waits in step s + 1 for the one that wrote the key at s's end, and sees it at s + 1's end
STOP_MARGIN = 1


class _StopOnSignal(TrainerCallback):
    """Notes the signal; at each step's end sets the agreed stop step, and at it asks the Trainer to save and stop."""

    def __init__(self, name: str, output_dir: str) -> None:
        self.signum = getattr(signal, name.upper(), None)
        self.name, self.key = name.upper(), f"llamafactory_hera_stop:{output_dir}"
        self.received, self.stop_step, self.stopped = False, None, False

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        mine = self.signum is not None and threading.current_thread() is threading.main_thread()
        previous = signal.signal(self.signum, lambda *_: setattr(self, "received", True)) if mine else None
        try:
            yield
        finally:
            if mine:
                signal.signal(self.signum, previous)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_step is None and self.received and not dist.is_initialized():
            self.stop_step = state.global_step
        elif self.stop_step is None and self.signum is not None and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()  # torchrun's TCPStore: host-side, no device sync
            if self.received:  # the first rank to write sets the step for all
                store.compare_set(self.key, "", str(state.global_step + STOP_MARGIN))
            if store.check([self.key]):
                self.stop_step = int(store.get(self.key))
        if self.stop_step is not None and self.stop_step <= state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = self.stopped = True


class WholeCheckpoints:
    """Mix in front of a ``Trainer`` (see the module doc); ``save_on_signal``: the method's ``<prefix>_save_on_signal``
    (``recipe.keys.save_on_signal_key``), set by the method's trainer."""

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self.resumed_from = self._whole_resume(resume_from_checkpoint)
        stop = _StopOnSignal(self.save_on_signal, self.args.output_dir)  # type: ignore[attr-defined]
        self.add_callback(stop)  # type: ignore[attr-defined]
        with stop.handling():
            result = super().train(self.resumed_from, *args, **kwargs)  # type: ignore[misc]
        if not stop.stopped:
            return result
        say_once(f"{stop.name}: saved the whole checkpoint {self.args.output_dir}/checkpoint-"  # type: ignore
                 f"{self.state.global_step} and stopped; to go on, run the same recipe again with "  # type: ignore
                 "resume_from_checkpoint: true.")
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        raise SystemExit(0)

    def _whole_resume(self, value: Any) -> Any:
        """The checkpoint to resume from: ``value``, or for ``true`` / a half-written ``checkpoint-N`` (as
        LLaMA-Factory picks the last one) the newest whole one of its run; says what it passed over."""
        if not value:
            return value
        named = Path(self.args.output_dir if value is True else str(value))  # type: ignore[attr-defined]
        if value is not True and (not named.name.startswith(whole.CHECKPOINT_PREFIX)
                                  or named in whole.whole_checkpoints(named.parent)):
            return value
        newest, half = whole.newest_whole(named if value is True else named.parent)
        if half:
            say_once(f"resume: passed over {', '.join(path.name for path in half)} (half-written: a save that did not "
                     f"finish on every rank; kept, not deleted); resuming from {newest or 'the start (none whole)'}.")
        return str(newest) if newest else (value if value is True else None)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        args, run = self.args, Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        folder = run / f"{whole.CHECKPOINT_PREFIX}{self.state.global_step}"  # type: ignore[attr-defined]
        limit, args.save_total_limit, failed = args.save_total_limit, None, None  # rotation after the whole save
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        except Exception as error:  # noqa: BLE001 - every rank learns of it below, then it is raised
            failed = error
        finally:
            args.save_total_limit = limit
        if not _on_every_rank(failed is None, args.device):
            if failed is not None and not _lack_of_space(failed, run):
                raise failed
            raise RecipeError(_full_line(folder, run, failed))
        if args.should_save:
            whole.write_marker(folder, self.state.global_step, args.world_size)  # type: ignore[attr-defined]
            whole.rotate(run, limit, self.state.best_model_checkpoint)  # type: ignore[attr-defined]


def _on_every_rank(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (a collective at each save: every rank reaches it)."""
    if not dist.is_initialized():
        return ok
    failed = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(failed)
    return not failed.item()


def _lack_of_space(error: BaseException, run: Path) -> bool:
    """Whether a save failed for lack of space: ENOSPC / EDQUOT, their text (safetensors), or less free space than the
    last whole checkpoint took (torch.save's writer says only ``unexpected pos``)."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
        return True
    needed = whole.folder_bytes(whole.newest_whole(run)[0])
    return needed is not None and shutil.disk_usage(run).free < needed


def _full_line(folder: Path, run: Path, error: BaseException | None) -> str:
    newest = whole.newest_whole(run)[0]
    needed, free = whole.folder_bytes(newest), shutil.disk_usage(run).free
    size = f"it needs about {needed:,} bytes (the size of {newest.name}), " if newest and needed else ""
    kept = f"{newest} is kept, and is what resume_from_checkpoint: true takes" if newest else "no whole checkpoint yet"
    why = f"{type(error).__name__}: {(str(error) + chr(10)).splitlines()[0]}" if error else "on another rank"
    return (f"{'disk full: ' if error else ''}the checkpoint {folder} could not be written ({why}); {size}"
            f"{free:,} bytes are free there. It is not marked whole; {kept}. Free space (or "
            "set save_total_limit, or another output_dir) and run again.")
