"""Which ``checkpoint-N`` of a run is whole: what resume may take and rotation may delete. docs/hera.md ("Killed,
preempted, disk full").

The plugin's stages (``llamafactory_hera.training.checkpoints``) write :data:`MARKER` last, once every rank made its
own files durable, and remove it from a folder saved again (a run resumed from an earlier step) before they write
into it. Whole: a folder with the marker, in a run whose record (``run_record``) says its checkpoints are
marked; in a run folder whose record predates markers (or that has none) and where no folder is marked, a folder with
``trainer_state.json`` (the main process writes it last). A half-written folder is passed over, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .run_record import CHECKPOINTS_MARKED, RUN_RECORD, read_record

MARKER, TRAINER_STATE = "llamafactory_hera_whole.json", "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


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
    found, whole = checkpoint_folders(run), whole_checkpoints(run)
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
    ranks, and ``about``: the run's settings and its resume's lineage, :mod:`.pinned_resume`), fsynced under another
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
