"""What a user of the watchdog (llamafactory_hera/training/watchdog.py, watch_bounds.py, watch_judge.py,
watch_stack.py) would lose to a one-line slip, each on a fake clock and a fake store, one pulse's part at a time: a
healthy job ended by one failed store call, a storage stall never probed, a pulse thread killed by a reset connection,
every rank named for the store's silence, the run's own pulse and pause threshold, a save's place in its step, the
multi-node wait for the line, a stuck rank spared by any moving one, a collective's spinning taken for progress, a rank
that left named."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from watch_fakes import Clock, FakeStore, beat, dog

from llamafactory_hera.runtime import job_store
from llamafactory_hera.training import watch_stack
from llamafactory_hera.training.watch_bounds import place_of, pulse_for
from llamafactory_hera.training.watch_judge import Judge


def test_one_failed_store_call_that_recovers_ends_nothing() -> None:
    """A store call fails once (a connection reset the next call survives); calls succeed after it: a bound later the
    job goes on (before: the failure's time was kept, and the job ended as if the store had been silent since)."""
    store = FakeStore()
    clock = Clock()
    rank = dog(store, clock, 1)
    store.fail = RuntimeError("Connection reset by peer")
    clock.now = 1.0
    rank._publish()
    assert rank.failing == 1.0
    store.fail = None
    clock.now = 2.0
    rank._publish()
    clock.now = 31.0  # three bounds later
    rank._store_check()
    assert rank.ended == []


def test_a_reset_connection_does_not_end_the_pulse() -> None:
    """A store call's OSError (ConnectionResetError, a refused reconnect) is a failed call, timed like any other: the
    pulse goes on instead of its thread dying silently, and the store's silence is named a bound later."""
    store = FakeStore()
    clock = Clock()
    rank = dog(store, clock, 0, world=1)
    store.fail = ConnectionResetError(104, "Connection reset by peer")
    beat(rank, 1.0)  # a monotonic clock is never 0
    beat(rank, 12.0)
    assert rank.ended == ["watchdog: the job's store at store-host:29500 has not answered for 10 s. Every rank exits "
                          "1; run the same command again to go on."]


def test_a_failed_read_names_the_store_not_every_rank() -> None:
    """Rank 0's reads fail for longer than the bound while both ranks were heard: the line names the store, not ranks
    0 and 1 "unheard" (the judge does not run on a read that failed)."""
    store = FakeStore()
    clock = Clock()
    monitor = dog(store, clock, 0)
    other = dog(store, clock, 1)
    other._publish()
    beat(monitor, 0.0)
    store.fail = RuntimeError("Connection reset by peer")
    for now in (5.0, 11.0, 16.0):
        beat(monitor, now)
    assert len(monitor.ended) == 1 and "the job's store at store-host:29500 has not answered" in monitor.ended[0]


class _Probe:
    def __init__(self) -> None:
        self.asked = 0

    def ask(self) -> None:
        self.asked += 1

    def waiting(self, pulse: float) -> float:
        return 0.0


def test_the_pulse_probes_the_storage_once_the_rank_stops_moving() -> None:
    """While a rank's progress moves its storage is never probed (a step touches no file system); once it stood still
    for two pulses (a save stalled on output_dir) each pulse asks the probe, which the beat then reports."""
    clock = Clock()
    rank = dog(FakeStore(), clock, 1)
    rank.probe = _Probe()
    rank.enter("the save of checkpoint-4", "save", 4)
    for second in range(0, 20, 2):  # a pulse every 2.5 s, a stage done every 2 s
        clock.now = second * 1.25
        rank.progress()
        rank._pulse()
    assert rank.probe.asked == 0
    for _ in range(4):
        clock.now += rank.pulse_s
        rank._pulse()
    assert rank.probe.asked == 3  # at 1, 2 and 3 pulses still: from the second on


def test_the_pulse_and_the_pause_threshold_a_run_gets() -> None:
    """The real pulse: 5 s, a quarter of a recipe bound under 20 s, at least 0.5 s. A rank finds itself paused when
    its own guard's tick is more than 3 pulses late (15 s at the default), and stays so for 5 pulses after."""
    assert [pulse_for(timeout) for timeout in (None, 0, 60.0, 20.0, 8.0, 1.0, 0.4)] == [5.0, 5.0, 5.0, 5.0, 2.0, 0.5,
                                                                                       0.5]
    clock = Clock()
    assert dog(FakeStore(), clock, 1, timeout=8.0).pulse_s == 2.0
    rank = dog(FakeStore(), clock, 1, timeout=None)
    assert rank.pulse_s == 5.0
    clock.now = 15.0
    assert not rank._was_paused()
    clock.now = 15.5
    assert rank._was_paused()
    rank._paused(clock.now)
    rank.guarded = clock.now
    clock.now += 24.5
    rank.guarded = clock.now  # its guard ticks again
    assert rank._was_paused()
    clock.now += 1.0
    rank.guarded = clock.now
    assert not rank._was_paused()


def test_a_rank_stuck_in_its_step_is_named_not_the_one_waiting_in_the_save_after_it() -> None:
    """Rank 1 is stuck in step 4 after 3 units of progress; rank 0 finished step 4 and waits at the start of its save
    (no progress yet). The save's place after the step in each beat's position names rank 1."""
    clock = Clock()
    ranks = [dog(FakeStore(), clock, rank, timeout=30.0) for rank in (0, 1)]
    ranks[1].enter("step 4", "step", 4)
    for _ in range(3):
        ranks[1].progress()
    ranks[0].enter("the save of checkpoint-4", "save", 4)
    judge = Judge([0, 1], 0.0, 600.0)
    for now in range(0, 41, 5):
        for rank in (0, 1):
            judge.observe(rank, ranks[rank].beat(), float(now))
    assert [(entry.rank, entry.why) for entry in judge.named(31.0)] == [(1, "stuck")]


def test_rank_0_waits_for_every_nodes_log_before_it_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes of four ranks: the place counts 2 nodes, and rank 0 ending the job waits until both nodes' first
    ranks said the line (before: one node, and rank 0 exited at once, taking the store with it)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "0")
    args = SimpleNamespace(world_size=8, process_index=0, local_process_index=0)
    place = place_of(args, FakeStore())
    assert (place.nodes, place.node) == (2, "0")
    store = FakeStore()
    polls = []

    def sleep(seconds: float) -> None:  # the other node says the line at rank 0's third look
        polls.append(seconds)
        if len(polls) == 3:
            store.add("job/told/count", 1)

    monkeypatch.setattr(job_store.time, "sleep", sleep)
    rank = dog(store, Clock(), 0)
    job_store.wait_told(store, rank.keys, place.node, place.says, True, place.nodes, 60.0)
    assert len(polls) == 3 and store.data["job/told/count"] == b"2"


def test_any_rank_moving_ahead_does_not_spare_the_stuck_one_behind() -> None:
    """Rank 1 is stuck in step 4; rank 0 waits for it; rank 2, ahead of both, still moves (its own save's stages):
    rank 1 is named. Only a rank that still moves at the lowest position holds the naming back."""
    judge = Judge([0, 1, 2], 0.0, 600.0)
    for now in range(0, 41, 5):
        for rank, position in ((0, [4, 4, 2]), (1, [4, 4, 1]), (2, [4, 5, now])):
            beat = {"host": f"node{rank}", "section": "step 4", "kind": "step", "bound": 30, "pulse": now,
                    "position": position}
            judge.observe(rank, json.dumps(beat).encode(), float(now))
    assert [(entry.rank, entry.why) for entry in judge.named(31.0)] == [(1, "stuck")]


def test_a_thread_spinning_in_a_collective_does_not_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """A main thread in one of torch's collectives uses CPU time (NCCL's wait spins): not progress, where the same CPU
    time in the rank's own code is. Here the thread blocks in a function of a file named as torch's collectives are,
    while its CPU time is made to grow at every look."""
    ticks = iter(range(1000))
    monkeypatch.setattr(watch_stack, "_thread_ticks", lambda native_id: next(ticks))
    monkeypatch.setattr(watch_stack, "_children", list)  # the test process's own (a warm launcher) are not the run's
    release = threading.Lock()
    release.acquire()
    moves = {}
    for name, path in (("collective", "/site-packages/torch/distributed/distributed_c10d.py"), ("own", "/run.py")):
        code: dict[str, Any] = {}
        exec(compile("def wait(lock):\n    lock.acquire()\n    lock.release()\n", path, "exec"), code)
        thread = threading.Thread(target=code["wait"], args=(release,), daemon=True)
        thread.start()
        while not _in(thread, path):  # until it waits in the lock
            time.sleep(0.01)
        looked = watch_stack.MainThread(thread)
        looked.look()
        moves[name] = (looked.look(), looked.look(), looked.in_collective)
    release.release()
    assert moves == {"collective": (False, False, True), "own": (True, True, False)}


def _in(thread: threading.Thread, path: str) -> bool:
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_filename == path


def test_a_rank_that_left_is_never_named() -> None:
    """Rank 1 leaves the run (its watchdog stopped: its last beat says so) while rank 0 still saves the final model
    for long: rank 1 is not named unheard."""
    store = FakeStore()
    clock = Clock()
    monitor = dog(store, clock, 0)
    other = dog(store, clock, 1)
    other._publish()
    beat(monitor, 0.0)
    other.stop()
    for now in range(5, 60, 5):
        monitor.progress()
        beat(monitor, float(now))
    assert monitor.ended == []
    assert json.loads(store.data["job/beat/1"]).get("left")
