"""A plugin run's watchdog: a rank gone silent (its process or host frozen or lost, or cut off from ``output_dir``)
ends the job with one line on every other rank, in minutes instead of ``ddp_timeout``. The heartbeat files, the
sections' bounds and why a shared file rather than the process group's store: docs/hera.md ("Killed, preempted, disk
full", a frozen or lost node).

Each rank keeps ``<output_dir>/llamafactory_hera_watchdog/rank-<r>.json`` (its host, its section, that section's
:func:`bound`), rewritten by its thread every :data:`PULSE` s and on a change of section. Silence is measured on the
reader's clock (no clock is compared across hosts). The steps only set the section (no file write, host sync or
collective on their path); a peer never heard from in this launch (a folder the nodes do not share) is not watched.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llamafactory_hera.log import say

FOLDER = "llamafactory_hera_watchdog"
PULSE = 5.0  # seconds between a rank's heartbeat writes and its reads of the others'
PAUSED = 3  # pulses: a longer gap between this rank's own checks means it was paused itself (SIGSTOP, swap)
FIRST = {"loading": 1800.0, "step": 900.0, "save": 900.0}  # a section's first bound; a pass before step 1: loading's
LATER_FLOOR, FACTOR = 300.0, 4.0  # a step's or save's later bounds: max(LATER_FLOOR, FACTOR x the last one's time)
EXIT_CODE = 1
Silent = tuple[int, dict[str, Any], float]  # (rank, its last heartbeat, seconds unheard)


def bound(kind: str, last: float | None, timeout: float | None) -> float:
    """Seconds a rank in a section of ``kind`` may go unheard: the recipe's ``timeout`` when set, else the first bound
    (loading and the passes before step 1 always), else ``FACTOR`` x ``last`` (the last such section's time), at
    least ``LATER_FLOOR``. A live rank's thread may pause that long (a C call holding the GIL, a file system's
    hiccup)."""
    if timeout:
        return float(timeout)
    if last is None or kind not in ("step", "save"):
        return FIRST.get(kind, FIRST["loading"])
    return max(LATER_FLOOR, FACTOR * last)


@dataclass
class Peer:
    """What this rank saw of another's heartbeat file."""

    raw: bytes | None = None  # its content at the last read
    since: float = 0.0  # when it last changed (this rank's clock)
    read: bool = False  # read before: a change after that is this launch's (an earlier launch's file is not)
    heard: bool = False  # changed in this launch
    ended: bool = False  # its file went away: the rank ended (its error, or the run's end, ends the job)
    beat: dict[str, Any] = field(default_factory=dict)


class Watch:
    """The others' heartbeats as this rank reads them (pure: reads and times are passed in)."""

    def __init__(self, ranks: list[int], now: float, launch: str = "") -> None:
        self.peers, self.launch = {rank: Peer(since=now) for rank in ranks}, launch

    def observe(self, rank: int, raw: bytes | None, now: float) -> None:
        """Rank ``rank``'s file read at ``now`` (None: no file)."""
        peer, read = self.peers[rank], self.peers[rank].read
        peer.read, peer.ended = True, peer.ended or (raw is None and peer.heard)
        if raw is not None and raw != peer.raw:
            with contextlib.suppress(ValueError):  # a write caught half-way: read again at the next pulse
                beat = json.loads(raw)  # this launch's: it carries the launch's mark, or it changed since read
                mine = bool(self.launch) and beat.get("launch") == self.launch
                peer.beat, peer.raw, peer.since, peer.heard = beat, raw, now, peer.heard or read or mine

    def paused(self, now: float) -> None:
        """This rank itself was paused: the silence it would see is its own."""
        for peer in self.peers.values():
            peer.since = now

    def silent(self, now: float) -> list[Silent]:
        """The ranks heard in this launch, not ended, unheard for longer than their bounds."""
        return [
            (rank, peer.beat, now - peer.since)
            for rank, peer in sorted(self.peers.items())
            if peer.heard and not peer.ended and now - peer.since > float(peer.beat.get("bound", 0) or 0)
        ]


def ending_line(silent: list[Silent], rank: int) -> str:
    """The line a surviving ``rank`` prints before it ends its process (the silent ranks by host)."""
    hosts: dict[str, list[Silent]] = {}
    for entry in silent:
        hosts.setdefault(str(entry[1].get("host", "?")), []).append(entry)
    named = "; ".join(
        f"rank{'s' * (len(group) > 1)} {', '.join(str(r) for r, _, _ in group)} on {host}, unheard for "
        f"{max(s for _, _, s in group):.0f} s in {group[0][1].get('section', '?')} (bound "
        f"{float(group[0][1].get('bound', 0)):.0f} s)"
        for host, group in hosts.items()
    )
    return (
        f"watchdog: {named}: its process or host is frozen or gone, or it cannot write output_dir. Rank {rank} "
        f"ends (exit {EXIT_CODE}) so that the job ends instead of waiting for ddp_timeout; to go on, run the same "
        "command again (with resume_from_checkpoint: true it continues from the newest whole checkpoint)."
    )


class Watchdog:
    """This rank's heartbeat and its thread (see the module doc); the run calls :meth:`enter` only."""

    def __init__(
        self,
        folder: Path,
        rank: int,
        world_size: int,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
        launch: str = "",
    ) -> None:
        self.folder, self.rank, self.timeout, self.clock, self.launch = folder, rank, timeout, clock, launch
        self.last: dict[str, float] = {}  # kind -> the last such section's measured seconds
        self.section, self.kind, self.entered = "loading", "loading", clock()
        self.pulse, self.stopped, self.moved = 0, threading.Event(), threading.Event()
        self.watch = Watch([r for r in range(world_size) if r != rank], self.entered, launch)
        self.thread = threading.Thread(target=self._run, name="llamafactory-hera-watchdog", daemon=True)

    def enter(self, section: str, kind: str) -> None:
        """This rank is now in ``section`` (of ``kind``: its bounds' history); the one before it is timed."""
        now = self.clock()
        self.last[self.kind] = now - self.entered
        self.section, self.kind, self.entered = section, kind, now
        self.moved.set()  # the thread writes it (a file write off the step's path)

    def beat(self) -> bytes:
        self.pulse += 1
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "section": self.section,
                "bound": bound(self.kind, self.last.get(self.kind), self.timeout),
                "pulse": self.pulse,
                "launch": self.launch,
            }
        ).encode()

    def _write(self) -> None:
        with contextlib.suppress(OSError):  # a failed write counts as silence on the others' side
            (self.folder / f"rank-{self.rank}.json").write_bytes(self.beat())

    def _read(self, rank: int) -> bytes | None:
        try:
            return (self.folder / f"rank-{rank}.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return b""  # unreadable now (a stale NFS handle): no change seen

    def _run(self) -> None:
        checked = self.clock()
        while not self.stopped.is_set():
            self.moved.wait(max(0.0, PULSE - (self.clock() - checked)))  # a pulse, or a section's change first
            self.moved.clear()
            if self.stopped.is_set():
                break
            self._write()
            now = self.clock()
            if now - checked >= PULSE:  # the others are read once a pulse
                if now - checked > PAUSED * PULSE:
                    self.watch.paused(now)
                checked = now
                for rank in self.watch.peers:
                    self.watch.observe(rank, self._read(rank), self.clock())
                silent = self.watch.silent(self.clock())
                if silent and not self.stopped.is_set():
                    say(ending_line(silent, self.rank))
                    os._exit(EXIT_CODE)
            self.stopped.wait(PULSE / 10)  # at most 10 writes a pulse, however short the steps

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.moved.set()
        self.thread.join(2 * PULSE)  # not longer: a read stuck on a hung file system
        for remove in (self.folder / f"rank-{self.rank}.json").unlink, self.folder.rmdir:  # the last one out: both
            with contextlib.suppress(OSError):
                remove()


_running: list[Watchdog] = []  # this process's watchdog while a run is watched (none or one)


@contextlib.contextmanager
def watching(training_args: Any, timeout: float | None) -> Iterator[None]:
    """A plugin run watched for the block (several processes, ``timeout`` not 0), which the ranks leave together (a
    barrier, still watched): a rank frozen in the final save (rank 0's alone) is named, not waited for by the others'
    launchers, and LLaMA-Factory's teardown of the process group next finds no rank in a collective (gloo aborts)."""
    dog = None
    if training_args.world_size > 1 and timeout != 0:
        dog = Watchdog(
            Path(training_args.output_dir) / FOLDER,
            training_args.process_index,
            training_args.world_size,
            timeout,
            launch=launch_mark(),
        )
        dog.start()
        _running.append(dog)
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if dog is not None:
            _running.remove(dog)
            dog.stop()


def launch_mark() -> str:
    """One mark per launch, the same on every rank: the first rank's, through the process group's store, which every
    launch starts new (a requeue's ranks then tell the frozen rank's file of the start before from their peers' files,
    however early a peer froze). Empty without a process group."""
    if not dist.is_initialized():
        return ""
    store = dist.distributed_c10d._get_default_store()  # host-side: no device sync
    return store.compare_set(f"{FOLDER}:launch", "", uuid.uuid4().hex).decode()


def enter(section: str, kind: str) -> None:
    """This rank's section from now (see :meth:`Watchdog.enter`); nothing when the run is not watched."""
    for dog in _running:
        dog.enter(section, kind)


@contextlib.contextmanager
def section(name: str, kind: str | None = None) -> Iterator[None]:
    """``name`` (of ``kind``, default ``name``) for the block, then the section before it again."""
    before = [(dog, dog.section, dog.kind) for dog in _running]
    enter(name, kind or name)
    try:
        yield
    finally:
        for dog, previous, previous_kind in before:
            dog.enter(previous, previous_kind)
