"""A rank's watchdog's parts: the bounds, the pulse, the rank's place, its store client, the storage probe."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from llamafactory_hera.runtime import job_store
from llamafactory_hera.training.sections import SectionKind

# a kind's bound before one was timed
FIRST = {kind: 1800.0 for kind in SectionKind} | {SectionKind.STEP: 900.0, SectionKind.SAVE: 900.0}
TIMED = (SectionKind.STEP, SectionKind.SAVE, SectionKind.FINAL)  # bound later by the last one's time
LATER_FLOOR = 300.0  # later step/save bound: max(LATER_FLOOR, FACTOR x last time)
FACTOR = 4.0
PULSE = 5.0  # seconds between beats (shorter for a short recipe bound)
NOTICE_S = 3.0  # the ending rank's wait for each node's log to hold the line
NAMING_PULSES = 4  # past a bound: the monitor's read and verdict, each rank's read of it, its told mark


def pulse_for(timeout: float | None) -> float:
    return min(PULSE, max(0.5, timeout / 4)) if timeout else PULSE


def bound(kind: SectionKind, last: dict[SectionKind, float], timeout: float | None) -> float:
    """Seconds a rank in a ``kind`` section may go unheard or still (the final save: timed as the last save)."""
    if timeout:
        return float(timeout)
    timed = last.get(SectionKind.SAVE if kind == SectionKind.FINAL else kind)
    if kind in TIMED and timed is not None:
        return max(LATER_FLOOR, FACTOR * timed)
    return FIRST.get(kind, FIRST[SectionKind.LOADING])


@dataclass(frozen=True)
class Place:
    rank: int
    world: int
    local_rank: int
    node: str  # GROUP_RANK, else the host name
    nodes: int
    host: str
    store: str  # its address, for the lines

    @property
    def says(self) -> bool:
        """Whether this rank puts the job's last line in its node's log (one rank a node)."""
        return self.local_rank == 0


class StorageProbe:
    """Whether ``output_dir``'s file system answers: ``statvfs`` in a thread, asked only while the rank makes no
    progress."""

    def __init__(self, folder: str, clock: Callable[[], float]) -> None:
        self.folder = folder
        self.clock = clock
        self.since = None
        self.thread: threading.Thread | None = None

    def ask(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.since = self.clock()
            self.thread = threading.Thread(target=self._probe, name="llamafactory-hera-storage", daemon=True)
            self.thread.start()

    def _probe(self) -> None:
        with contextlib.suppress(OSError):
            os.statvfs(self.folder)
        self.since = None

    def waiting(self, pulse: float) -> float:
        """Seconds the probe in flight has waited; 0 under a pulse."""
        since = self.since
        waited = self.clock() - since if since is not None else 0.0
        return waited if waited >= pulse else 0.0


def place_of(training_args: Any, store: Any) -> Place:
    world = training_args.world_size
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or training_args.world_size)
    return Place(
        training_args.process_index,
        world,
        training_args.local_process_index,
        os.environ.get("GROUP_RANK") or socket.gethostname(),
        max(1, world // max(1, local)),
        socket.gethostname(),
        f"{store.host}:{store.port}",
    )


def job_client(timeout: float) -> Any:
    """Its own store client, calls bounded by ``timeout``: the process group's TCPStore, else
    ``MASTER_ADDR:MASTER_PORT``; None without either."""
    found = None
    if dist.is_available() and dist.is_initialized():
        found = dist.distributed_c10d._get_default_store()
        while hasattr(found, "underlying_store"):
            found = found.underlying_store
    where = (found.host, found.port) if hasattr(found, "host") else job_store.address()
    return job_store.client(where[0], where[1], timeout) if where else None


def lengthen_groups() -> list[str]:
    """Give each process group at least the default group's timeout (``ddp_timeout``); the names of those lengthened.
    A group a library makes without one (DeepSpeed's, FSDP2's meshes) has torch's 10 minutes under NCCL: it would end a
    hung rank before the watchdog names it."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    c10d = dist.distributed_c10d
    try:
        wanted = _timeout(c10d._get_default_group())
    except (ValueError, RuntimeError):  # no default group after all (a torn-down or stand-in one)
        return []
    lengthened = []
    for group in list(c10d._world.pg_map):
        have = _timeout(group)
        if wanted is not None and have is not None and have < wanted:
            # torch's private setter: a group it cannot set (not this rank's, a wrapper's) keeps its own timeout
            with contextlib.suppress(ValueError, RuntimeError, AssertionError, AttributeError):
                c10d._set_pg_timeout(wanted, group)
                lengthened.append(group.group_name)
    return lengthened


def _timeout(group: Any) -> timedelta | None:
    with contextlib.suppress(AttributeError, RuntimeError, IndexError):
        return group._get_backend(group._device_types[0]).options._timeout
    return None


def short_ddp_timeout(ddp_timeout: float | None, timeout: float | None) -> str | None:
    """The warning for a ``ddp_timeout`` under the seconds the watchdog may take to name a rank."""
    pulse = pulse_for(timeout)
    naming = (timeout or max(FIRST.values())) + NAMING_PULSES * pulse + NOTICE_S
    if not ddp_timeout or ddp_timeout >= naming:
        return None
    return (
        f"warning: ddp_timeout: {ddp_timeout:g} s is shorter than the watchdog's time to name a hung rank (up to "
        f"{naming:.0f} s): torch ends a hung collective first, without naming the rank that stopped. Set ddp_timeout: "
        "180000000 (as LLaMA-Factory's examples and the shipped recipes do)."
    )
