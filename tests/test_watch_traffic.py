"""The job store's traffic, counted: every store call the plugin makes, by rank and kind, on a counting store
(tests/counting_store.py) that behaves as TCPStore does, at 1,024 and 4,096 ranks (8 a node) on a simulated clock.

The real objects run: each rank's :class:`Watchdog` (its pulse thread driven turn by turn as the thread would be, on a
0.5 s grid), the steps' stop on the save signal (``training/checkpoints.py``), each node's :class:`StartWatch` and its
shared-output probe (``runtime/shared_output.py``). One simulated job: the ranks load (rank 0 starting a pulse after the
others), take a step every 0.5 s (ten a pulse), save in 2 s between two steps, and one rank alone gets the save signal;
every rank stops at the same step. The counts it prints are docs/multinode.md's ("What the watch costs the store")."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch.distributed as dist
from counting_store import CountingStore

from llamafactory_hera.runtime import job_store
from llamafactory_hera.runtime.launch_watch import StartWatch
from llamafactory_hera.runtime.shared_output import check_shared
from llamafactory_hera.training import checkpoints, watch_stop, watchdog
from llamafactory_hera.training.watch_bounds import PULSE, Place
from llamafactory_hera.training.watch_stop import StopStep
from llamafactory_hera.training.watchdog import Watchdog

PER_NODE = 8
GRID = 0.5  # the simulation's tick: a tenth of the pulse
STEP_S = 0.5  # ten steps a pulse
START = 20.0  # the load's end, the first step's start
SAVE_AT = 40  # a save after this step, 2 s
SIGNAL_AT = 50.0  # when one rank gets the save signal


class _Still:
    """The run's main thread, seen from the pulse: never moved (the load counts nothing here)."""

    in_collective = False
    compiling = False

    def look(self) -> bool:
        return False


def thread(dog: Watchdog) -> Iterator[float]:
    """The pulse thread's loop (``Watchdog._run``), one turn a step: yields the seconds it waits for a new section."""
    dog._placeholders()
    while not dog.stopped.is_set():
        dog.entered.clear()
        yield dog._turn()


class Job:
    """``ranks`` ranks' watchdogs and step stops on one counting store, on a simulated clock."""

    def __init__(self, ranks: int, thread_of: Callable[[Watchdog], Iterator[float]] = thread) -> None:
        self.now = 0.0
        self.ranks = ranks
        self.store = CountingStore()
        self.keys = job_store.launch_mark(self.store.client("set-up"))
        self.dogs = [
            Watchdog(Place(rank, ranks, rank % PER_NODE, str(rank // PER_NODE), ranks // PER_NODE,
                           f"node{rank // PER_NODE}", "127.0.0.1:29500"),
                     self.store.client(rank), self.keys, None, ".", clock=lambda: self.now)
            for rank in range(ranks)]
        self.stops = []
        for dog in self.dogs:
            dog.main = _Still()
            stop = checkpoints.StopOnSignal("sigterm", "out")
            stop.agreeing = dog.stopping
            dog.stopping.sleep = self.pause  # the noting rank's wait: every main thread waits, the pulses go on
            stop.noted = lambda: False
            self.stops.append(stop)
        self.thread_of = thread_of
        self.threads: dict[int, Iterator[float]] = {}
        self.wake: dict[int, float] = {}
        self.caller = 0  # whose store the steps' stop reads (the process group's store, one a rank)
        self.stopped_at: dict[int, int] = {}  # rank: the step it stopped at
        self.step = 0  # the step the ranks are in
        self.next_step = START  # when the next begins
        self.stop_time = 0.0  # when the last rank stopped

    def start(self, rank: int) -> None:
        self.dogs[rank].threads = []  # its pulse thread: :func:`thread`, driven here
        self.dogs[rank].start()
        self.threads[rank] = self.thread_of(self.dogs[rank])
        self.wake[rank] = self.now

    def run_threads(self) -> None:
        """Every started rank's pulse thread, as far as it goes at this tick."""
        for rank, turns in self.threads.items():
            dog = self.dogs[rank]
            while self.wake[rank] <= self.now or dog.entered.is_set():
                try:
                    self.wake[rank] = self.now + next(turns)
                except StopIteration:
                    self.wake[rank] = float("inf")
                    break

    def step_end(self, rank: int, step: int) -> bool:
        """The steps' stop at step ``step``'s end (the real callback); whether the rank stops there."""
        self.caller = rank
        stop = self.stops[rank]
        state = SimpleNamespace(global_step=step, max_steps=10**6)
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        stop.on_step_end(None, state, control)
        return control.should_training_stop

    def pause(self, seconds: float) -> None:
        """The main threads wait ``seconds`` (a rank's wait in its step's end holds the others in the next step's
        collective); the pulse threads go on."""
        self.now += seconds
        self.run_threads()

    def tick(self) -> None:
        """The main threads' work at this tick, then the pulse threads'."""
        if self.now >= self.next_step:
            self.next_step = self.now + STEP_S
            self.step += 1
            step = self.step
            for rank, dog in enumerate(self.dogs):
                if rank in self.stopped_at:
                    continue
                if step > 1 and self.step_end(rank, step - 1):
                    self.stopped_at[rank] = step - 1
                    self.stop_time = self.now
                    dog.enter(f"the save of checkpoint-{step - 1}", "save")
                    continue
                if step == SAVE_AT + 1 and dog.state.kind == "step":  # the save after SAVE_AT, 2 s long
                    dog.enter(f"the save of checkpoint-{SAVE_AT}", "save")
                    continue
                dog.enter(f"step {step}", "step", step)
                dog.progress()
                dog.progress()
        if self.now == SIGNAL_AT:  # noted at the end of the step in flight
            self.stops[self.ranks - 3].noted = lambda: True
        self.run_threads()

    def run(self, until: float) -> None:
        while self.now < until:
            self.tick()
            self.now += GRID


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Job]]:
    """Jobs whose steps' stop, unwatched, would read its rank's client of the counting store; nobody ends."""
    jobs: list[Job] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: jobs[-1].store.client(jobs[-1].caller))
    monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", lambda timeout: None, raising=False)
    monkeypatch.setattr(watchdog.Watchdog, "end", lambda self, line, store=True: pytest.fail(line))
    yield jobs


def simulate(jobs: list[Job], ranks: int, thread_of: Callable[[Watchdog], Iterator[float]] = thread) -> dict[str, Any]:
    """One job of ``ranks``: its store calls a rank a pulse in the load (rank 0 starting a pulse late, its placeholders
    included), in the steps (a save among them) and from the save signal to the stop."""
    job = Job(ranks, thread_of)
    jobs.append(job)
    found: dict[str, Any] = {"job": job}
    for rank in range(1, ranks):
        job.start(rank)
    job.run(PULSE + 2.0)
    job.start(0)
    for window, until in (("load", START), ("steps", SIGNAL_AT), ("signal", SIGNAL_AT + 4 * PULSE)):
        begun = job.now
        job.store.reset()
        job.run(until)
        pulses = (job.now - begun) / PULSE
        found[window] = job.store.count() / ranks / pulses
        found[f"{window} most"] = max(job.store.count(rank) for rank in range(ranks)) / pulses
        found[f"{window} monitor"] = job.store.count(0) / pulses
        found[f"{window} over 2"] = sum(job.store.count(rank) / pulses > 2.0 for rank in range(ranks))
    found["waited"] = len(job.store.waited)
    return found


@pytest.mark.parametrize("ranks", [1024, 4096])
def test_a_ranks_watchdog_makes_2_store_calls_a_pulse_and_every_rank_stops_at_one_step(
        counted: list[Job], ranks: int) -> None:
    """Two calls a rank a pulse in the steps and at the save signal, a save between two steps included (rank 0: its
    read of every beat one ``multi_get``); in the load, rank 0's placeholders once more. At the stop, the two ranks
    agreeing it (rank 0 and the one that got the signal) call more for a moment. Every rank stops at one step (the one
    that got the signal too)."""
    found = simulate(counted, ranks)
    job = found["job"]
    stops = sorted(set(job.stopped_at.values()))
    print(f"\n{ranks:,} ranks, a {PULSE:.0f} s pulse, store calls a rank a pulse: {found['steps']:.2f} in the steps "
          f"(the most of one rank {found['steps most']:.2f}), {found['signal']:.2f} from the save signal to the stop "
          f"(the most {found['signal most']:.2f}): {found['steps'] * ranks / PULSE:,.0f} calls/s; in the load "
          f"{found['load']:.2f} (rank 0: {found['load monitor']:.0f}, its placeholders once); the signal noted at "
          f"step {job.stops[ranks - 3].agreeing.signalled}'s end, every rank stopped at step {stops} "
          f"{job.stop_time - SIGNAL_AT:.1f} s after it", flush=True)
    assert found["waited"] == 0
    assert found["steps most"] <= 2.0 and found["steps"] <= 2.0
    # at the stop, rank 0 and the rank that noted it read a tenth of a pulse apart until every rank heard the step
    assert found["signal"] <= 2.0 + 2 * 20 / ranks and found["signal over 2"] <= 2, found
    assert found["load"] <= 2.0 + PULSE / START
    assert len(job.stopped_at) == ranks and stops == [job.stops[ranks - 3].agreeing.signalled + 1]


def test_on_steps_of_30_s_the_stop_is_the_step_after_the_signal(
        counted: list[Job], monkeypatch: pytest.MonkeyPatch) -> None:
    """30 s steps: a rank notes the signal at step 2's end; rank 0, in step 3, reads it: every rank stops at step 3,
    as when the ranks agreed through a store call a step."""
    monkeypatch.setattr(sys.modules[__name__], "STEP_S", 30.0)
    job = Job(64)
    counted.append(job)
    for rank in range(64):
        job.start(rank)
    job.run(START + 5 * 30.0)
    assert set(job.stopped_at.values()) == {3} and len(job.stopped_at) == 64


def test_the_start_watch_reads_once_a_node_a_poll_and_node_0_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node's launcher joins (two calls once); then, while the ranks start, node 0's reads the counts of nodes
    joined and ranks started, the others the verdict: nodes + 1 calls a poll for the job. Node 0 sets the launch
    started and every watch ends."""
    for nodes in (128, 512):
        store = CountingStore()
        clients = iter([store.client(node) for node in range(nodes)])
        monkeypatch.setattr(job_store, "client", lambda host, port, timeout, clients=clients: next(clients))
        watches = [StartWatch(("127.0.0.1", 29500), node, nodes, 600.0, pytest.fail, clock=lambda: 0.0)
                   for node in range(nodes)]
        for watch in watches:
            watch.expect(PER_NODE * nodes)
            assert watch.missing() is not None
        store.reset()
        for watch in watches:
            watch.missing()
        poll = store.count()
        keys = job_store.launch_mark(store.client("ranks"))
        store.client("ranks").add(keys.started, PER_NODE * nodes)
        assert [watch.missing() for watch in watches] == [None] * nodes
        print(f"\nthe start watch at {nodes} nodes: {poll} store calls a poll (a poll a second)", flush=True)
        assert poll == nodes + 1 and all(watch.done.is_set() and not watch.ended for watch in watches)


def test_the_shared_output_probe_makes_5_calls_a_node(tmp_path: Path) -> None:
    """Each node's probe: its name set, the others' waited for and read in one call, its look set and waited for."""
    nodes = 128
    store = CountingStore()
    probes = [threading.Thread(target=check_shared, args=(tmp_path, store.client(node), "p/", node, nodes, 60, 5))
              for node in range(nodes)]
    for probe in probes:
        probe.start()
    for probe in probes:
        probe.join(60)
    print(f"\nthe shared-output probe at {nodes} nodes: {store.count() / nodes:.0f} store calls a node, once",
          flush=True)
    assert store.count() == 5 * nodes and not any(tmp_path.iterdir())


def test_a_rank_freezing_as_its_save_begins_is_named_in_its_save(counted: list[Job]) -> None:
    """The save's beat goes at once, in place of the pulse's write: a rank frozen right after is seen in its save."""
    job = Job(16)
    counted.append(job)
    for rank in range(16):
        job.start(rank)
    job.run(START + 3.0)
    job.store.reset()
    job.dogs[5].enter("the save of checkpoint-6", "save")
    job.run_threads()
    del job.threads[5]  # frozen: its pulse thread never turns again
    job.run(job.now + 3 * PULSE)
    assert job.store.count(5) == 1
    assert json.loads(job.store.data[job.keys.beat(5)])["section"] == "the save of checkpoint-6"
    assert job.dogs[0].judge.seen[5].beat["kind"] == "save"


def test_the_rank_that_noted_the_signal_waits_for_the_stop_step_on_real_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' watchdogs, their threads on a real TCPStore (a 0.1 s pulse): rank 1 notes the signal at step 3's end
    and waits there for rank 0's beat to carry the stop step (rank 0 in step 4: step 4); rank 0 has it too. (The wait
    itself, on a simulated clock: the tests above.)"""
    monkeypatch.setattr(watchdog, "pulse_for", lambda timeout: 0.1)
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    keys = job_store.launch_mark(server)
    dogs = [Watchdog(Place(rank, 2, 0, str(rank), 2, f"node{rank}", f"127.0.0.1:{server.port}"),
                     job_store.client("127.0.0.1", server.port, 1.0), keys, None, ".") for rank in (0, 1)]
    dogs[0].enter("step 4", "step", 4)
    dogs[1].enter("step 3", "step", 3)
    for dog in dogs:
        dog.start()
    try:
        heard = dogs[1].stopping.noted(3, True)  # None where the machine's load held the threads past its wait
        deadline = time.monotonic() + 30
        while heard is None and time.monotonic() < deadline:
            time.sleep(0.05)
            heard = dogs[1].stopping.noted(4, False)
        assert heard == 4 and dogs[0].stopping.noted(4, False) == 4
    finally:
        for dog in dogs:
            dog.stop()


def test_the_stop_step_is_rank_0s_step_at_least_the_one_after_the_noting_ranks() -> None:
    """Rank 0 a step behind the rank that noted it at step 5's end: step 6; rank 0 in step 6 or 7 (the others wait in
    its collective): that step. Only a beat's ``signal`` key counts, not a section named so."""
    for rank_0_in, stop in ((5, 6), (6, 6), (7, 7)):
        found = StopStep(threading.Event(), PULSE)
        found.agree(rank_0_in, [5])
        found.agree(rank_0_in + 1, [5])  # set once
        assert found.fields(True) == {"stop": stop, "heard": stop, "everyone": False}
        assert found.step == stop and found.fields(False) == {"heard": stop}
    beats = [b"-", b'{"section": "signal", "pulse": 3}', b'{"pulse": 4, "signal": 5}']
    assert watch_stop.signalled(beats) == [5]


def test_the_stop_is_agreed_once_every_rank_still_in_the_run_heard_it() -> None:
    """Rank 0 counts the ranks whose beats say they heard the stop step; one that has not (its pulse thread held
    late on a loaded host) keeps the noting rank waiting, so it cannot end the step after unknowing and go on alone
    while the others save. A rank that left counts as heard; the others hear that every rank did from rank 0's beat."""
    monitor = StopStep(threading.Event(), PULSE)
    monitor.agree(6, [5])
    assert monitor.pending(True) and not monitor.pending(False)
    monitor.count([{"heard": 6}, {"heard": 6}, {"pulse": 9}])
    assert not monitor.everyone and monitor.pending(True)
    monitor.count([{"heard": 6}, {"heard": 6}, {"heard": 5}, {"left": True}])
    assert not monitor.everyone
    monitor.count([{"heard": 6}, {"heard": 6}, {"left": True}])
    assert monitor.everyone and not monitor.pending(True)
    other = StopStep(threading.Event(), PULSE)
    other.heard({"stop": 6, "everyone": False})
    assert other.step == 6 and not other.everyone and not other.pending(False)
    other.heard({"stop": 6, "everyone": True})
    assert other.everyone
