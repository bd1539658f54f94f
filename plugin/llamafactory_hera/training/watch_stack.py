"""What the run's main thread is doing, as the watchdog's thread sees it at each pulse (``training/watchdog.py``).

LLaMA-Factory's load (its data, the model, the Trainer's set-up) reports no progress the plugin can count, so while a
rank loads, its progress is read off the main thread itself: its Python stack, the CPU time it has used (Linux) and
the counts of the live progress bars (``tqdm``: the datasets' maps, the checkpoint shards). Any of them changing
between two looks is progress: a thread blocked in a wait uses no CPU and stays where it is. And a rank
whose main thread is inside ``torch.distributed`` (or DeepSpeed's ``comm``) is waiting for the others in a collective:
the monitor names a rank stuck in its load only when another waits for it (``training/watch_judge.py``).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

# where a main thread waits for the other ranks: torch's collectives and store, DeepSpeed's wrappers of them
COLLECTIVE_PATHS = ("/torch/distributed/", "/deepspeed/comm/")


class MainThread:
    """Looks at one thread (the one that builds it, by default): :meth:`look` says whether it moved since the last
    look; :attr:`in_collective` whether it was in a collective at that look."""

    def __init__(self, thread: threading.Thread | None = None) -> None:
        thread = thread or threading.current_thread()
        self.ident = thread.ident
        self.cpu_file = f"/proc/self/task/{thread.native_id}/stat"
        self.last: Any = None
        self.in_collective = False

    def look(self) -> bool:
        """Whether the thread's stack or a progress bar changed since the last look (the first look: True)."""
        frame = sys._current_frames().get(self.ident)
        stack = []
        in_collective = False
        while frame is not None:
            # the code and the instruction it is at: a loop that calls the same function again still moves the
            # bars, or the instruction between two calls
            stack.append((id(frame.f_code), frame.f_lasti))
            in_collective = in_collective or any(path in frame.f_code.co_filename for path in COLLECTIVE_PATHS)
            frame = frame.f_back
        seen = (tuple(stack), _bars(), self._cpu_ticks())
        moved = seen != self.last
        self.last = seen
        self.in_collective = in_collective
        return moved

    def _cpu_ticks(self) -> int:
        """The thread's CPU time so far, in clock ticks (0 where /proc does not tell: the stack and bars alone)."""
        try:
            with open(self.cpu_file) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0
        # after the name: state is field 3 of stat(5), utime and stime fields 14 and 15
        return int(fields[11]) + int(fields[12])


def _bars() -> tuple[tuple[int, float], ...]:
    """Every live ``tqdm`` bar's identity and count (none when tqdm is not imported)."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return ()
    try:  # the bars are a weak set that the main thread changes meanwhile
        bars = list(std.tqdm._instances)
    except RuntimeError:
        return ()
    return tuple(sorted((id(bar), getattr(bar, "n", 0)) for bar in bars))
