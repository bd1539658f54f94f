"""Whether the files a rank writes grow, as its watchdog's pulse sees them: a save that writes for longer than its
bound still makes progress while its bytes arrive, and so does a download into the hub's cache.

Two measures: this process's ``write_bytes`` (``/proc/self/io``), free to the file system; and a walk of the folder
being written (``sections.writing``) for what bytes miss (a rotation's files going). Only each node's first rank walks,
at most :data:`WALKED` stats, where nothing else moves: 4,096 ranks walking a ZeRO-3 checkpoint of 8,000 files would
ask a metadata server millions of stats a second.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

from llamafactory_hera.training import sections

CHECKPOINTS = ("checkpoint-", "tmp-checkpoint-")  # the saves' folders in output_dir, not the final save's
WALKED = 512  # the most files a walk stats; the rest it counts by name
# bytes written between two looks that are a save's, not a log's lines (a rank's output goes to a file under SLURM)
WROTE = 1 << 20


class Measure(NamedTuple):
    """A walk of a folder: its files and their bytes."""

    folder: str
    files: int
    size: int  # their bytes


class Growth:
    """Each :meth:`look` says whether the folder being written changed between the last two walks."""

    def __init__(self, output_dir: str, walks: bool = True) -> None:
        self.output_dir = output_dir
        self.walks = walks  # this node's first rank: the one that walks
        self.written = written_bytes()
        self.measured: Measure | None = None  # the last walk's (set by the walking thread)
        self.seen: Measure | None = None  # the walk compared at the last look
        self.thread: threading.Thread | None = None
        self.progress: int | None = None

    def look(self, kind: sections.SectionKind, progress: int, waiting: bool) -> bool:
        """Whether the files grew (or went) since the walk before; the next walk starts unless one runs, this rank
        waits in a collective, or its count moved."""
        still = progress == self.progress
        self.progress = progress
        written = written_bytes()
        wrote = written - self.written >= WROTE
        if wrote or written < self.written:
            self.written = written
        folder = sections.written()
        if folder is None and kind != sections.SectionKind.FINAL:
            self.seen = self.measured = None
            return False
        measured = self.measured
        same_folder = measured is not None and self.seen is not None and measured.folder == self.seen.folder
        grew = same_folder and measured != self.seen
        self.seen = measured
        idle = self.thread is None or not self.thread.is_alive()
        if self.walks and still and not waiting and not wrote and idle:
            self.thread = threading.Thread(
                target=self._walk, args=(folder,), name="llamafactory-hera-growth", daemon=True
            )
            self.thread.start()
        return wrote or grew

    def _walk(self, folder: str | None) -> None:
        self.measured = measure(folder) if folder is not None else measure(self.output_dir, skip=CHECKPOINTS)


def measure(folder: str, skip: tuple[str, ...] = ()) -> Measure:
    """The files below ``folder`` (but the folders named as ``skip`` starts) and their bytes."""
    files = 0
    size = 0
    stated = 0
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                found = list(entries)
        except OSError:  # gone meanwhile (a rotation), or not there yet (a download's first bytes)
            continue
        for entry in found:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith(skip):
                        pending.append(entry.path)
                    continue
                if stated < WALKED:
                    size += entry.stat(follow_symlinks=False).st_size
                    stated += 1
            except OSError:  # gone meanwhile
                continue
            files += 1
    return Measure(folder, files, size)


def written_bytes() -> int:
    try:
        with open("/proc/self/io") as counters:
            for line in counters:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
