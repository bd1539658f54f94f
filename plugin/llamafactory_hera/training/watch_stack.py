"""What the run's main thread is doing, as the watchdog's thread sees it at each pulse: LLaMA-Factory's load reports
no progress the plugin can count, so a loading rank's progress is read off its main thread (docs/multinode.md, "What
it watches"). A thread polling in place (a 0.05 s sleep in a loop, as datasets' ``map(num_proc)`` waits on a
deadlocked worker) goes round the same few stacks on almost no CPU. In one of torch's collectives, CPU time is no
progress (NCCL's wait spins). Not seen: an NCCL collective queued without a wait, whose rank then blocks at a host sync
elsewhere; the process group's timeout bounds that one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

# where a main thread waits for the other ranks, as its innermost frame: torch's collectives (a module's states'
# broadcast among them) and DeepSpeed's wrappers of them; not FSDP's or DTensor's own work, nor an outer wrapper
COLLECTIVE_PATHS = (
    "/torch/distributed/distributed_c10d.py",
    "/torch/distributed/c10d_logger.py",
    "/torch/distributed/utils.py",
    "/deepspeed/comm/",
)
BUSY = 0.05  # share of one CPU between two looks that is work, not a poll's wake-ups
# torch's compiler: a step that recompiles (a new shape) reaches no point for minutes, its main thread busy in there
COMPILER_PATHS = ("/torch/_dynamo/", "/torch/_inductor/")
TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's CPU time unit a second
POLLED = 256  # stacks remembered since the last move; a thread that finds new ones beyond that moves


class MainThread:
    """Looks at one thread (by default the one that builds it). Its CPU time counts with that of the thread pools'
    workers: a model loader's threads read the shards while it waits on them."""

    def __init__(self, thread: threading.Thread | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        looked = thread or threading.current_thread()
        self.ident = looked.ident
        # the OS's id of the calling thread: a process forked on Python 3.11 keeps its parent's in native_id
        self.native_id = looked.native_id if thread is not None else threading.get_native_id()
        self.clock = clock
        self.looked: float | None = None
        self.ticks: int | None = None  # the CPU time then (None in a collective)
        self.bars: tuple[tuple[int, float], ...] = ()
        self.stacks: set[tuple[int, ...]] = set()  # the stacks seen since it last worked (a poll loop's few)
        self.in_collective = False
        self.compiling = False  # at the last look: busy on the CPU inside torch's compiler

    def look(self) -> bool:
        """Whether the thread moved since the last look: a bar moved, it used CPU time beyond a poll's, or it is at a
        stack not seen since either."""
        frame = sys._current_frames().get(self.ident)
        innermost = frame.f_code.co_filename.replace("\\", "/") if frame is not None else ""
        in_collective = any(path in innermost for path in COLLECTIVE_PATHS)
        codes = []
        compiler = False
        while frame is not None:
            codes.append(id(frame.f_code))  # the functions, not the line: a loop's turns are one stack
            path = frame.f_code.co_filename.replace("\\", "/")
            compiler = compiler or any(part in path for part in COMPILER_PATHS)
            frame = frame.f_back
        stack = tuple(codes)
        now = self.clock()
        ticks = None if in_collective else self._cpu_ticks()
        bars = _bars()
        busy = self._busy(ticks, now)
        self.compiling = compiler and busy
        worked = self.looked is None or bars != self.bars or busy
        if worked or len(self.stacks) >= POLLED:
            self.stacks.clear()
        moved = worked or stack not in self.stacks
        self.stacks.add(stack)
        self.looked = now
        self.ticks = ticks
        self.bars = bars
        self.in_collective = in_collective
        return moved

    def _busy(self, ticks: int | None, now: float) -> bool:
        if ticks is None or self.ticks is None or self.looked is None:
            return False
        return ticks - self.ticks >= max(1.0, BUSY * (now - self.looked) * TICKS_S)

    def _cpu_ticks(self) -> int:
        """CPU ticks so far of the thread, the pools' workers and the child processes (datasets' ``map(num_proc)``
        workers tokenize while the main thread polls their queue); 0 where /proc does not tell."""
        workers = [t.native_id for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
        own = sum(_thread_ticks(native_id) for native_id in [self.native_id, *workers])
        return own + sum(_stat_ticks(f"/proc/{child}/stat") for child in _children())


def _children() -> list[str]:
    found: list[str] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                found += children.read().split()
        except OSError:
            continue
    return found


def _thread_ticks(native_id: int | None) -> int:
    return _stat_ticks(f"/proc/self/task/{native_id}/stat")


def _stat_ticks(path: str) -> int:
    try:
        with open(path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    # after the name: state is field 3 of stat(5), utime and stime fields 14 and 15
    return int(fields[11]) + int(fields[12])


def _bars() -> tuple[tuple[int, float], ...]:
    """Every live ``tqdm`` bar's identity and count."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return ()
    try:  # the bars are a weak set that the main thread changes meanwhile
        bars = list(std.tqdm._instances)
    except RuntimeError:
        return ()
    return tuple(sorted((id(bar), getattr(bar, "n", 0)) for bar in bars))
