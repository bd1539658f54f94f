"""The CPU's own count of the work a thread does: retired instructions and cycles (Linux ``perf_event_open``).

Wall time on a shared machine moves with what the neighbours do: on the project's 2-core CPU machine one training
step of the same batch took 1.5-2.7 s, and the instructions it retired per cycle went from 1.8 to 2.2 between runs
and within a run. The number of instructions a step retires does not move (10.01-10.04 G for every step of the
``cpu-mid`` recipe): it says whether one run does more work than another, independent of the machine's state; the
cycles say what that work cost on this machine at that moment.

Counted: user space of the calling thread only (``exclude_kernel``, allowed at ``perf_event_paranoid`` <= 2), so
the benchmarks that use it run torch with one thread (``OMP_NUM_THREADS=1``), where the training is on that thread.
:func:`print_monitor_counters` prints ``overhead.py --monitor --counters``' table of them.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import struct

_SYSCALL = {"x86_64": 298, "aarch64": 241}  # __NR_perf_event_open
_HARDWARE, _CYCLES, _INSTRUCTIONS = 0, 0, 1
_EXCLUDE_KERNEL, _EXCLUDE_HV = 1 << 5, 1 << 6


class _Attr(ctypes.Structure):
    """``struct perf_event_attr`` up to ``sample_max_stack`` (PERF_ATTR_SIZE_VER5, 112 bytes)."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
                ("branch_sample_type", ctypes.c_uint64), ("sample_regs_user", ctypes.c_uint64),
                ("sample_stack_user", ctypes.c_uint32), ("clockid", ctypes.c_int32),
                ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
                ("sample_max_stack", ctypes.c_uint16), ("reserved", ctypes.c_uint16)]


class ThreadCounters:
    """Instructions and cycles of the thread that made it, from its creation; :meth:`read` gives both."""

    def __init__(self) -> None:
        number = _SYSCALL.get(platform.machine())
        if number is None or not platform.system() == "Linux":
            raise OSError(f"hardware counters: no perf_event_open on {platform.system()} {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        self._fds = []
        for config in (_INSTRUCTIONS, _CYCLES):
            attr = _Attr(type=_HARDWARE, size=ctypes.sizeof(_Attr), config=config,
                         flags=_EXCLUDE_KERNEL | _EXCLUDE_HV)
            fd = libc.syscall(number, ctypes.byref(attr), 0, -1, -1, 0)
            if fd < 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"hardware counters: perf_event_open: {os.strerror(errno)} (a virtual machine "
                                     "without a PMU, a container or kernel.perf_event_paranoid > 2 can forbid them)")
            self._fds.append(fd)

    def read(self) -> tuple[int, int]:
        """(instructions, cycles) retired in user space by the thread so far."""
        instructions, cycles = (struct.unpack("Q", os.read(fd, 8))[0] for fd in self._fds)
        return instructions, cycles


def thread_counters() -> tuple[ThreadCounters | None, str]:
    """(counters of the calling thread, "") or (None, why they are unavailable: "hardware counters: ...", without
    the ``[Errno N]`` that ``str(OSError)`` puts first; the reason names the errno's text)."""
    try:
        return ThreadCounters(), ""
    except OSError as err:
        return None, err.strerror if err.errno is not None and err.strerror else str(err)


def print_monitor_counters(off: list[dict], on: list[dict]) -> None:
    """The monitor's cost in the work the training thread does (instructions; cycles for what it cost here), which
    the machine's load does not move: whole training per A/B pair, and each step without a point against the same
    step of the run without the monitor (same data, same order)."""
    if not all(run["counts"] for run in (*off, *on)):
        print(f"{'instructions, cycles':26}not counted: {(off + on)[0]['counters_unavailable']}")
        return
    if any(run["torch_threads"] != 1 for run in (*off, *on)):
        print(f"{'':26}note: torch ran {on[0]['torch_threads']} threads; only the main thread is counted "
              "(set OMP_NUM_THREADS=1)")
    def total(run: dict, index: int) -> float:
        return (run["end_count"][index] - run["counts"][0][index]) / 1e9  # train begin to train end

    for index, label in ((0, "instructions"), (1, "cycles")):
        pairs = sorted(total(b, index) / total(a, index) for a, b in zip(off, on, strict=True))
        a, b = statistics.median(total(r, index) for r in off), statistics.median(total(r, index) for r in on)
        print(f"{f'{label}, training (G)':26}{a:10.2f}{b:10.2f}{b / a:8.3f}   "
              f"{statistics.median(pairs):.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f})")
    ratios = []
    for a, b in zip(off, on, strict=True):
        scored = set(b["monitor_steps"])
        for step in range(1, len(b["counts"])):
            # counts[s] is read at the end of step s before the monitor's callback: a point at step s (0: at train
            # begin, after counts[0]) falls in the interval from counts[s] to counts[s + 1]
            if step - 1 in scored:
                continue
            ratios.append((b["counts"][step][0] - b["counts"][step - 1][0])
                          / (a["counts"][step][0] - a["counts"][step - 1][0]))
    if not ratios:
        print(f"{'steps without a point':26}none: every step scored {on[0]['monitor_steps']}")
        return
    ratios.sort()
    print(f"{'steps without a point':26}instructions on/off, same step: median {statistics.median(ratios):.4f} "
          f"({ratios[0]:.4f}-{ratios[-1]:.4f}) over {len(ratios)} steps")
