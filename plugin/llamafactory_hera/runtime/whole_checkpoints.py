"""Which ``checkpoint-N`` of a run is whole: what resume may take and rotation may delete. docs/hera.md ("Killed,
preempted, disk full").

The plugin's stages (``llamafactory_hera.training.checkpoints``) write :data:`MARKER` last, once every rank made its
own files durable, and remove it from a folder saved again (a run resumed from an earlier step) before they write
into it. Whole: a folder with the marker, in a run whose record (``run_record``) says its checkpoints are
marked; in a run folder whose record predates markers (or that has none) and where no folder is marked, a folder with
``trainer_state.json`` (the main process writes it last). A half-written folder is passed over, never deleted.

What a marker holds besides: the training settings the checkpoint was saved with (:func:`settings`), which a resume
names where they differ from its own (:func:`differences`: the Trainer restores the optimizer's and scheduler's state
as saved, so an edited learning rate goes unused, and an edited batch size moves the data on in batches of the new
size, with no word of either); and the lineage of a pinned resume. A ``resume_from_checkpoint: PATH`` that the recipe
keeps (a pin) is honoured once: the start that takes it records it in the run's record (:func:`take`), the
checkpoints saved from there on carry its lineage, and a later start of the same command (a requeue) continues from
the newest of those (:func:`newest_since`) instead of going back to the pin; a pin the record does not hold (a
rollback) is taken afresh. Lineages, not times: file times on a shared file system are the server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.run_record import (
    CHECKPOINTS_MARKED,
    PINNED_RESUME,
    RUN_RECORD,
    read_record,
    write_record,
)

MARKER = "llamafactory_hera_whole.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# a marker's keys (a pinned resume's lineage: the run record's too)
LINEAGE = "lineage"
SETTINGS = "settings"
# restored from the checkpoint with the optimizer's parameter groups: the recipe's value is not used
KEPT = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
# this recipe's from the resumed step on
APPLIED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "ranks",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "optim",
    "seed",
)


def checkpoint_folders(folder: Path) -> list[Path]:
    """``folder``'s ``checkpoint-N`` folders, by step (the last is the one LLaMA-Factory resumes from, as transformers'
    ``get_last_checkpoint`` picks it); none where ``folder`` is no folder."""
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return [path for _, path in sorted(found)]


def newest_whole(run: Path) -> tuple[Path | None, list[Path]]:
    """(the newest whole ``checkpoint-N`` of ``run``, or None; the half-written ones newer than it)."""
    found = checkpoint_folders(run)
    whole = whole_checkpoints(run)
    later = found[found.index(whole[-1]) + 1 :] if whole else found
    return (whole[-1] if whole else None), later


def whole_checkpoints(run: Path) -> list[Path]:
    """``run``'s whole checkpoints, by step."""
    found = checkpoint_folders(run)
    marked = read_record(run / RUN_RECORD).get(CHECKPOINTS_MARKED) or any((path / MARKER).is_file() for path in found)
    return [path for path in found if (path / (MARKER if marked else TRAINER_STATE)).is_file()]


def _fsync(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # another rank's file, renamed or removed by its writer meanwhile
        handle = os.open(path, os.O_RDONLY)
        os.fsync(handle)
        os.close(handle)


def make_durable(folder: Path) -> None:
    """Every file under ``folder`` fsynced: by each rank, its own files on disk before the ranks agree (an fsync
    flushes only this host's writes to a folder shared across nodes)."""
    for path in sorted(folder.rglob("*")):
        _fsync(path)


def write_marker(folder: Path, step: int, ranks: int, about: dict[str, Any] | None = None) -> None:
    """Mark ``folder`` whole once every rank made its files durable (:func:`make_durable`): the marker (the step, the
    ranks, and ``about``: the run's :func:`settings` and its pinned resume's lineage), fsynced under another
    name and renamed (a write that fails leaves no marker), then the folder fsynced."""
    temporary = folder / f"{MARKER}.tmp"
    temporary.write_text(json.dumps({"step": step, "ranks": ranks, **(about or {})}), encoding="utf-8")
    _fsync(temporary)
    temporary.replace(folder / MARKER)
    _fsync(folder)


def read_marker(folder: Path) -> dict[str, Any]:
    """What ``folder``'s marker says (``{}``: none, or one written before it said more than the step)."""
    return read_record(folder / MARKER)


def unmark(folder: Path) -> None:
    """Before a save into ``folder`` that exists (a run resumed from an earlier step saves that step again): its old
    marker goes first, on disk before any new file, so that a save cut short leaves a half-written folder, never the
    new files beside the old ones under the old marker."""
    if (folder / MARKER).is_file():
        (folder / MARKER).unlink(missing_ok=True)
        _fsync(folder)


def rotate(run: Path, limit: int | None, keep: str | Path | tuple[str | Path | None, ...] | None) -> None:
    """``save_total_limit`` after a whole save: the oldest whole checkpoints beyond ``limit`` go (never ``keep``: the
    best one, and the one just saved, which a run resumed from an earlier step may have saved below older ones), each
    unmarked first (a kill amid its deletion leaves it half-written, not whole); half-written ones stay."""
    kept = {Path(path) for path in (keep if isinstance(keep, tuple) else (keep,)) if path}
    for path in whole_checkpoints(run)[:-limit] if limit and limit > 0 else []:
        if path not in kept:
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def _plain(value: Any) -> Any:
    value = value.value if isinstance(value, Enum) else value
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def settings(args: Any) -> dict[str, Any]:
    """The settings of :data:`KEPT` and :data:`APPLIED` of a Trainer's ``args`` (``ranks``: its world size)."""
    found = {key: _plain(getattr(args, key)) for key in (*KEPT, *APPLIED) if hasattr(args, key)}
    found["ranks"] = _plain(getattr(args, "world_size", 1))
    return found


def differences(folder: Path, saved: dict[str, Any], now: dict[str, Any], step: Any) -> str | None:
    """The line naming what differs between ``saved`` (the checkpoint ``folder``'s settings) and ``now``, else None
    (also for a checkpoint whose marker holds no settings)."""
    changed = [key for key in (*KEPT, *APPLIED) if key in saved and key in now and saved[key] != now[key]]
    if not changed:
        return None
    kept = [key for key in changed if key in KEPT]
    applied = [key for key in changed if key in APPLIED]
    parts = [f"Kept from the checkpoint's optimizer state: {', '.join(kept)}."] if kept else []
    parts += [f"This recipe's from step {step} on: {', '.join(applied)}."] if applied else []
    return (
        f"resume: {folder} was saved with other settings than this recipe's: "
        + "; ".join(f"{key} {saved[key]} there, {now[key]} here" for key in changed)
        + f". {' '.join(parts)} To go on as the run began, set them back."
    )


def _resolved(pin: Any) -> str:
    return str(Path(str(pin)).expanduser().resolve())


def taken(output_dir: Path, pin: Any) -> dict[str, Any] | None:
    """The run record's entry when an earlier start of the run in ``output_dir`` took ``pin`` (its ``checkpoint``, its
    ``lineage`` and when it was ``taken``), else None."""
    entry = read_record(output_dir / RUN_RECORD).get(PINNED_RESUME)
    if isinstance(entry, dict) and entry.get("checkpoint") == _resolved(pin) and entry.get(LINEAGE):
        return entry
    return None


def saved_since(output_dir: Path, lineage: str) -> list[Path]:
    """The whole checkpoints of ``output_dir`` saved in ``lineage`` (since its pin was taken), by step."""
    return [path for path in whole_checkpoints(output_dir) if read_marker(path).get(LINEAGE) == lineage]


def newest_since(output_dir: Path, pin: Any) -> Path | None:
    """The newest whole checkpoint saved since an earlier start took ``pin``, or None (not taken, or none saved)."""
    entry = taken(output_dir, pin)
    since = saved_since(output_dir, entry[LINEAGE]) if entry else []
    return since[-1] if since else None


def take(output_dir: Path, pin: Any) -> dict[str, Any]:
    """Record in the run's record (by its main process) that this start takes ``pin``, under a new lineage."""
    entry = {
        "checkpoint": _resolved(pin),
        LINEAGE: uuid.uuid4().hex,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path = output_dir / RUN_RECORD
    write_record(path, {**read_record(path), PINNED_RESUME: entry})
    return entry
