"""A ``resume_from_checkpoint: PATH`` that the recipe keeps (a pin) is honoured once: the start that takes it records
it in the run's record (:mod:`.run_record`) under a lineage, every checkpoint saved from there on carries that lineage
in its marker (:mod:`.whole_checkpoints`), and a later start of the same command (a requeue) continues from the newest
of those instead of going back to the pin. A pin the record does not hold (another checkpoint: a rollback) is taken
afresh. docs/hera.md ("Killed, preempted, disk full").

Lineages, not times: a marker is written by the run's main process and read on any node, and file times on a shared
file system are the server's. Imports nothing heavy.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from .run_record import PINNED_RESUME, RUN_RECORD, read_record, write_record
from .whole_checkpoints import read_marker, whole_checkpoints

LINEAGE = "lineage"  # the marker's and the record's key


def resolved(pin: Any) -> str:
    """The pin as the record holds it: its absolute path."""
    return str(Path(str(pin)).expanduser().resolve())


def taken(output_dir: Path, pin: Any) -> dict[str, Any] | None:
    """The record's entry when an earlier start of the run in ``output_dir`` took ``pin`` (its ``checkpoint``, its
    ``lineage`` and when it was ``taken``), else None."""
    entry = read_record(output_dir / RUN_RECORD).get(PINNED_RESUME)
    if isinstance(entry, dict) and entry.get("checkpoint") == resolved(pin) and entry.get(LINEAGE):
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
        "checkpoint": resolved(pin),
        LINEAGE: uuid.uuid4().hex,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path = output_dir / RUN_RECORD
    write_record(path, {**read_record(path), PINNED_RESUME: entry})
    return entry
