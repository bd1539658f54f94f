"""The watchdog at 1,024 ranks against one real TCPStore (in this process), on a simulated clock: every rank's beat
written to the store each 5 s pulse as its watchdog builds it, rank 0's monitor reading all of them in one call and
judging them (llamafactory_hera/training/watchdog.py, watch_judge.py). One simulated timeline: a 10-minute stall of
output_dir's file system during a save (nobody named; the same stall without the ranks' probes would have named them
at the save's bound), then a rank frozen in a step, then a rank stuck alive in a step. It prints the monitor's time a
pulse and the simulated seconds to each line; the store calls, counted: tests/test_watch_traffic.py."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from llamafactory_hera.runtime import job_store
from llamafactory_hera.training.watch_bounds import LATER_FLOOR, Place
from llamafactory_hera.training.watch_judge import Judge
from llamafactory_hera.training.watchdog import Watchdog

RANKS = 1024
PER_NODE = 8
PULSE = 5.0
CLIENTS = 8


class Job:
    """``RANKS`` simulated ranks (their watchdogs, no threads) sharing ``CLIENTS`` connections to one store."""

    def __init__(self, port: int, ranks: int = RANKS) -> None:
        self.now = 0.0
        self.ranks = ranks
        clients = [job_store.client("127.0.0.1", port, 30.0) for _ in range(CLIENTS)]
        self.keys = job_store.launch_mark(clients[0])
        self.dogs = [
            Watchdog(Place(rank, ranks, rank % PER_NODE, str(rank // PER_NODE), ranks // PER_NODE,
                           f"node{rank // PER_NODE}", f"127.0.0.1:{port}"),
                     clients[rank % CLIENTS], self.keys, None, ".", clock=lambda: self.now)
            for rank in range(ranks)]
        self.monitor: Judge = self.dogs[0].judge
        self.frozen: set[int] = set()
        self.spent = 0.0
        self.pulses = 0
        for rank in range(ranks):  # the monitor's placeholders, one call each at its start
            clients[0].compare_set(self.keys.beat(rank), "", b"-")

    def pulse(self) -> list[tuple[int, str]]:
        """Every rank not frozen writes its beat (batched a connection here: one ``set`` a rank on a cluster); rank
        0's monitor reads them all and judges."""
        batches: dict[int, tuple[list[str], list[bytes]]] = {}
        for dog in self.dogs:
            if dog.place.rank not in self.frozen:
                keys, values = batches.setdefault(dog.place.rank % CLIENTS, ([], []))
                keys.append(self.keys.beat(dog.place.rank))
                values.append(dog.beat())
        for client, (keys, values) in batches.items():
            self.dogs[client].store.multi_set(keys, values)
        started = time.perf_counter()
        keys = [self.keys.beat(rank) for rank in range(self.ranks)]
        for rank, raw in enumerate(self.dogs[0].store.multi_get(keys)):
            self.monitor.observe(rank, raw, self.now)
        named = [(entry.rank, entry.why) for entry in self.monitor.named(self.now)]
        self.spent += time.perf_counter() - started
        self.pulses += 1
        return named

    def run(self, until: float, act: Any = None) -> tuple[list[tuple[int, str]], float]:
        """Pulses until simulated time ``until`` or until the monitor names someone (what, when); ``act(t)`` first
        each pulse."""
        while self.now < until:
            self.now += PULSE
            if act is not None:
                act(self.now)
            named = self.pulse()
            if named:
                return named, self.now
        return [], self.now


def _steps(job: Job, moving: set[int], step: int) -> None:
    """Ranks ``moving`` run step ``step``: entered, its forward begun and done."""
    for rank in moving:
        job.dogs[rank].enter(f"step {step}", "step", step)
        job.dogs[rank].progress()
        job.dogs[rank].progress()


def _save(job: Job, stall: tuple[float, float] | None, report: bool = True) -> Any:
    """A save of checkpoint-4 on every rank, one stage done a pulse, except in ``stall`` (from, to), when output_dir's
    file system does not answer: no rank moves, and each one's probe of output_dir waits (when ``report``)."""
    for dog in job.dogs:
        dog.enter("the save of checkpoint-4", "save", 4)

    def act(now: float) -> None:
        stalled = stall is not None and stall[0] <= now < stall[1]
        for dog in job.dogs:
            dog.probe.since = stall[0] if stalled and report else None
            if not stalled:
                dog.progress()

    return act


@pytest.fixture(scope="module")
def port() -> Any:
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    yield server.port


def test_1024_ranks_a_storage_stall_a_frozen_rank_and_a_stuck_one(port: int) -> None:
    job = Job(port)
    everyone = set(range(RANKS))
    for dog in job.dogs:  # a first save of 10 s: the next save's bound is the floor, 300 s
        dog.enter("the save of checkpoint-2", "save", 2)
    job.now += 10.0
    _steps(job, everyone, 3)
    job.now += 20.0
    assert job.run(job.now + 10.0)[0] == []
    # a 10-minute storage stall in the save of checkpoint-4 (bound 300 s): nobody named
    act = _save(job, (job.now + 10.0, job.now + 610.0))
    assert job.dogs[1].bound() == LATER_FLOOR
    assert job.run(job.now + 620.0, act)[0] == []
    # step 5: rank 517 freezes as rank 901 stops inside its forward (begun, never done); the others finish theirs
    # and wait for them in the step's collective, alive
    for dog in job.dogs:
        dog.enter("step 5", "step", 5)
        dog.progress()
        if dog.place.rank != 901:
            dog.progress()
    job.frozen.add(517)
    stopped = job.now
    bound = job.dogs[1].bound()
    frozen, frozen_named = job.run(job.now + 600.0)
    job.frozen.discard(517)  # its node taken out of the job: its last beat says it left
    job.dogs[517].stopped.set()
    stuck, stuck_named = job.run(job.now + 600.0)
    to_frozen = frozen_named - stopped
    to_stuck = stuck_named - stopped
    print(f"\n1,024 ranks, one TCPStore, a {PULSE:.0f} s pulse: the monitor's read and judgement of 1,024 beats: "
          f"{1000 * job.spent / job.pulses:.1f} ms a pulse; a "
          f"600 s storage stall in a save (bound {LATER_FLOOR:.0f} s): nobody named; a frozen rank named "
          f"{to_frozen:.0f} s after it froze, a stuck one {to_stuck:.0f} s after it stopped (bound {bound:.0f} s)",
          flush=True)
    assert frozen == [(517, "unheard")] and stuck == [(901, "stuck")]
    assert bound <= to_frozen <= bound + 2 * PULSE and bound <= to_stuck <= bound + 3 * PULSE


def test_the_same_stall_without_the_ranks_probes_would_name_them_at_the_saves_bound(port: int) -> None:
    """The control (64 ranks: the judgement does not depend on their number): the stall above with no probe
    reported names every rank stuck at the save's bound."""
    job = Job(port, ranks=64)
    for dog in job.dogs:
        dog.enter("the save of checkpoint-2", "save", 2)
    job.now += 10.0
    moved = job.now + 5.0  # the last pulse before the stall
    act = _save(job, (job.now + 10.0, job.now + 610.0), report=False)
    named, when = job.run(job.now + 700.0, act)
    assert len(named) == 64 and {why for _, why in named} == {"stuck"}
    assert LATER_FLOOR < when - moved <= LATER_FLOOR + PULSE
