"""The CPU's own count of the work a thread does: retired instructions and cycles (Linux ``perf_event_open``).

Wall time on a shared machine moves with what the neighbours do: on the project's 2-core CPU machine one training
step of the same batch took 1.5-2.7 s, and the instructions it retired per cycle went from 1.8 to 2.2 between runs
and within a run. The number of instructions a step retires does not move (10.01-10.04 G for every step of the
``cpu-mid`` recipe): it says whether one run does more work than another, independent of the machine's state; the
cycles say what that work cost on this machine at that moment.

Counted: user space of the calling thread only (``exclude_kernel``, allowed at ``perf_event_paranoid`` <= 2), so
the benchmarks that use it run torch with one thread (``OMP_NUM_THREADS=1``), where the training is on that thread.
"""

from __future__ import annotations

import ctypes
import os
import platform
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
