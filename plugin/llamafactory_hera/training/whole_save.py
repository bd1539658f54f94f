"""Checkpoints a run can trust, and a stop that saves one: :class:`WholeCheckpoints`, mixed in front of every method's
Trainer. docs/hera.md ("Resume") says what users see.

- Each ``checkpoint-N`` is marked whole (``lifecycle.whole_checkpoints``) once every rank's save returned; the
  Trainer's ``save_total_limit`` rotation runs only after that, over whole checkpoints.
- A save that fails for lack of space (``ENOSPC`` / ``EDQUOT``, or an error with less free space left than the last
  whole checkpoint took) ends every rank with one line naming the folder and the bytes; the failed folder gets no
  marker and the previous whole checkpoint stays.
- Resume takes the newest whole checkpoint, saying which half-written ones it passed over.
- ``<prefix>_save_on_signal``: the signal's handler only notes it; at a step's end the ranks agree on one stop step
  through the process group's store (a host-side key: no device sync; one ``check`` of the key per step), save a
  whole checkpoint there and exit 0 with a line saying how to resume. One process stops at the next step's end.
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

STOP_MARGIN = 2  # steps between a rank noting the signal and the stop: every rank checks the key at one of them
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def _store() -> Any:
    """The process group's key-value store (torchrun's TCPStore), or None in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


class _StopOnSignal(TrainerCallback):
    """Notes the signal; at each step's end sets the agreed stop step, and at it asks the Trainer to save and stop."""

    def __init__(self, name: str, output_dir: str) -> None:
        self.signum = getattr(signal, name.upper(), None)
        self.name, self.key = name.upper(), f"llamafactory_hera_stop:{output_dir}"
        self.received, self.stop_step, self.stopped = False, None, False

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(self.signum, self._note)
        try:
            yield
        finally:
            signal.signal(self.signum, previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        store = _store() if self.signum is not None else None
        if self.stop_step is None and store is None and self.received:
            self.stop_step = state.global_step
        elif self.stop_step is None and store is not None:
            if self.received:  # the first rank to write sets the step for all
                store.compare_set(self.key, "", str(state.global_step + STOP_MARGIN))
            if store.check([self.key]):
                self.stop_step = int(store.get(self.key))
        if self.stop_step is not None and self.stop_step <= state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = self.stopped = True


class WholeCheckpoints:
    """Mix in front of a ``Trainer`` (see the module doc); ``save_on_signal``: the method's ``<prefix>_save_on_signal``
    (``recipe.keys.save_on_signal_key``)."""

    save_on_signal = "sigterm"
    resumed_from: str | None = None

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
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        raise SystemExit(0)

    def _whole_resume(self, value: Any) -> Any:
        """The checkpoint to resume from: ``value``, or for ``true`` / a half-written ``checkpoint-N`` (as
        LLaMA-Factory picks the last one) the newest whole one of its run; says what it passed over."""
        if not value:
            return value
        named = Path(self.args.output_dir if value is True else str(value))  # type: ignore[attr-defined]
        if value is not True and (not named.name.startswith(whole.CHECKPOINT_PREFIX) or whole.is_whole(named)):
            return value
        newest, half = whole.newest_whole(named if value is True else named.parent)
        if half:
            say_once(whole.passed_over(newest, half))
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
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    failed = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(failed)
    return not failed.item()


def _lack_of_space(error: BaseException, run: Path) -> bool:
    """Whether a save failed for lack of space: ENOSPC / EDQUOT, their text (safetensors), or less free space than the
    last whole checkpoint took (torch.save's writer says only ``unexpected pos``)."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in str(error) for t in FULL_TEXTS):
        return True
    needed = whole.folder_bytes(whole.newest_whole(run)[0])
    return needed is not None and shutil.disk_usage(run).free < needed


def _full_line(folder: Path, run: Path, error: BaseException | None) -> str:
    newest = whole.newest_whole(run)[0]
    needed = whole.folder_bytes(newest)
    size = f"it needs about {needed:,} bytes (the size of {newest.name}), " if newest and needed else ""
    kept = f"{newest} is kept, and is what resume_from_checkpoint: true takes" if newest else "no whole checkpoint yet"
    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error is not None \
        else "another rank could not write its part"
    return (f"disk full: the checkpoint {folder} could not be written ({why}); {size}"
            f"{shutil.disk_usage(run).free:,} bytes are free there. It is not marked whole; {kept}. Free space (or "
            "set save_total_limit, or another output_dir) and run again.")
