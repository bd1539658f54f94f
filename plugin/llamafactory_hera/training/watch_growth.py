"""Whether the files a rank writes grow, as its watchdog's pulse sees them (``training/watchdog.py``): a save that
writes for longer than its bound still makes progress while its bytes arrive (a busy parallel file system, a large
model's full state dict), and so does a download into the hub's cache.

The folder is the one the run names (``sections.writing``: a checkpoint's, a download's, a rotation's); in the final
save, where the host writes, ``output_dir``'s files outside its checkpoints. One walk of that folder a pulse, in a
thread of its own: a stalled file system holds that thread alone (the storage probe tells that stall). A rank waiting
in a collective does not walk (under DDP the other ranks wait for rank 0's writes), nor one whose count moved since
the last pulse (a prediction's forwards): the walks stay where nothing else moves.
"""

from __future__ import annotations

import os
import threading

from llamafactory_hera.training import sections

CHECKPOINTS = ("checkpoint-", "tmp-checkpoint-")  # the saves' folders in output_dir, not the final save's
Measure = tuple[str, int, int]  # the folder, its files, their bytes


class Growth:
    """Each :meth:`look` says whether the folder being written changed between the last two walks."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.measured: Measure | None = None  # the last walk's (set by the walking thread)
        self.seen: Measure | None = None  # the walk compared at the last look
        self.thread: threading.Thread | None = None
        self.progress: int | None = None  # the rank's count at the last look

    def look(self, kind: str, progress: int, waiting: bool) -> bool:
        """Whether the files grew (or went) since the walk before, in a ``kind`` section; the next walk starts unless
        one is still running, this rank waits in a collective, or its count (``progress``) moved since the last look."""
        still = progress == self.progress
        self.progress = progress
        folder = sections.written()
        if folder is None and kind != "final":
            self.seen = self.measured = None
            return False
        measured = self.measured
        grew = measured is not None and self.seen is not None and measured[0] == self.seen[0] and measured != self.seen
        self.seen = measured
        if still and not waiting and (self.thread is None or not self.thread.is_alive()):
            self.thread = threading.Thread(
                target=self._walk, args=(folder,), name="llamafactory-hera-growth", daemon=True
            )
            self.thread.start()
        return grew

    def _walk(self, folder: str | None) -> None:
        self.measured = measure(folder) if folder is not None else measure(self.output_dir, skip=CHECKPOINTS)


def measure(folder: str, skip: tuple[str, ...] = ()) -> Measure:
    """The files below ``folder`` (not in the folders whose names start as ``skip`` says) and their bytes; a file that
    goes meanwhile is left out."""
    files = 0
    size = 0
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
                size += entry.stat(follow_symlinks=False).st_size
            except OSError:  # gone meanwhile
                continue
            files += 1
    return folder, files, size
