"""Which ``checkpoint-N`` of a run is whole: what resume may take and rotation may delete. docs/hera.md ("Killed,
preempted, disk full").

The stages write :data:`MARKER` last, once every rank's files are durable, and remove it first from a folder saved
again. Whole: a marked folder where the run record says checkpoints are marked or some folder is; else one with
``trainer_state.json``. Half-written folders are passed over, never deleted.

A marker also holds its save's settings, which a resume names where they differ, and a pin's lineage: a kept
``resume_from_checkpoint: PATH`` is honoured once, and a requeue continues from the newest checkpoint of its lineage
(lineages, not times: a shared file system's times are the server's).
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
# a marker's keys (LINEAGE: the run record's too)
LINEAGE = "lineage"
SETTINGS = "settings"
# restored with the optimizer's parameter groups: the recipe's value goes unused
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
    """``checkpoint-N`` folders by step."""
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return [path for _, path in sorted(found)]


def newest_whole(run: Path) -> tuple[Path | None, list[Path]]:
    """(the newest whole checkpoint or None, the half-written ones newer than it)."""
    found = checkpoint_folders(run)
    whole = whole_checkpoints(run)
    later = found[found.index(whole[-1]) + 1 :] if whole else found
    return (whole[-1] if whole else None), later


def whole_checkpoints(run: Path) -> list[Path]:
    found = checkpoint_folders(run)
    marked = read_record(run / RUN_RECORD).get(CHECKPOINTS_MARKED) or any((path / MARKER).is_file() for path in found)
    return [path for path in found if (path / (MARKER if marked else TRAINER_STATE)).is_file()]


def _fsync(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # another rank's file, since renamed or removed
        handle = os.open(path, os.O_RDONLY)
        os.fsync(handle)
        os.close(handle)


def make_durable(folder: Path) -> None:
    """Fsync every file under ``folder`` (each rank, before the ranks agree: an fsync flushes only this host's
    writes)."""
    for path in sorted(folder.rglob("*")):
        _fsync(path)


def write_marker(folder: Path, step: int, ranks: int, about: dict[str, Any] | None = None) -> None:
    """Mark ``folder`` whole once every rank's files are durable: written under another name and renamed (a failed
    write leaves no marker)."""
    temporary = folder / f"{MARKER}.tmp"
    temporary.write_text(json.dumps({"step": step, "ranks": ranks, **(about or {})}), encoding="utf-8")
    _fsync(temporary)
    temporary.replace(folder / MARKER)
    _fsync(folder)


def read_marker(folder: Path) -> dict[str, Any]:
    return read_record(folder / MARKER)


def unmark(folder: Path) -> None:
    """Before a save into an existing ``folder``: drop its marker, on disk before any new file, so a cut save leaves a
    half-written folder, never new files under the old marker."""
    if (folder / MARKER).is_file():
        (folder / MARKER).unlink(missing_ok=True)
        _fsync(folder)


def rotate(run: Path, limit: int | None, keep: str | Path | tuple[str | Path | None, ...] | None) -> None:
    """``save_total_limit`` after a whole save: the oldest whole checkpoints beyond ``limit`` go, never ``keep`` (the
    best, and the one just saved: a resumed run may save it below older ones)."""
    kept = {Path(path) for path in (keep if isinstance(keep, tuple) else (keep,)) if path}
    for path in whole_checkpoints(run)[:-limit] if limit and limit > 0 else []:
        if path not in kept:
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def _plain(value: Any) -> Any:
    value = value.value if isinstance(value, Enum) else value
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def settings(args: Any) -> dict[str, Any]:
    found = {key: _plain(getattr(args, key)) for key in (*KEPT, *APPLIED) if hasattr(args, key)}
    found["ranks"] = _plain(getattr(args, "world_size", 1))
    return found


def differences(folder: Path, saved: dict[str, Any], now: dict[str, Any], step: Any) -> str | None:
    """The line naming what differs between ``saved`` (checkpoint ``folder``'s) and ``now``; None when nothing does."""
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
    """The run record's pin entry when an earlier start took ``pin``, else None."""
    entry = read_record(output_dir / RUN_RECORD).get(PINNED_RESUME)
    if isinstance(entry, dict) and entry.get("checkpoint") == _resolved(pin) and entry.get(LINEAGE):
        return entry
    return None


def saved_since(output_dir: Path, lineage: str) -> list[Path]:
    return [path for path in whole_checkpoints(output_dir) if read_marker(path).get(LINEAGE) == lineage]


def newest_since(output_dir: Path, pin: Any) -> Path | None:
    """The newest whole checkpoint saved since an earlier start took ``pin``; None if not taken or none saved."""
    entry = taken(output_dir, pin)
    since = saved_since(output_dir, entry[LINEAGE]) if entry else []
    return since[-1] if since else None


def take(output_dir: Path, pin: Any) -> dict[str, Any]:
    """Record (main process) that this start takes ``pin``, under a new lineage."""
    entry = {
        "checkpoint": _resolved(pin),
        LINEAGE: uuid.uuid4().hex,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path = output_dir / RUN_RECORD
    write_record(path, {**read_record(path), PINNED_RESUME: entry})
    return entry
