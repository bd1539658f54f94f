"""The watchdog of a plugin run's ranks (llamafactory_hera/training/watchdog.py, sections.py): its bounds, sections and
progress, and its threads on a real TCPStore in this process (a frozen rank, a stuck one, rank 0 frozen, a store that
never answers, a thawed rank, an earlier launch's rank); its key. What the monitor concludes:
tests/test_watch_judge.py; torch's timeouts left alone: tests/test_watch_backstop.py; one pulse's parts on a fake clock:
tests/test_watch_mutations.py; 1,024 ranks: tests/test_watch_scale.py; a frozen node of a real launch:
tests/test_multinode.py."""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from llamafactory_hera.harc.config import parse_harc_arguments
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.runtime import job_store, log
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.training import sections, watchdog
from llamafactory_hera.training.sections import SectionKind, Where
from llamafactory_hera.training.watch_bounds import FIRST, LATER_FLOOR, Place, bound
from llamafactory_hera.training.watchdog import Watchdog

FAST = 0.1  # the threads' pulse here (a run's is 5 s, or a quarter of a short bound)


def test_bounds_first_then_from_the_last_section() -> None:
    assert bound("loading", {}, None) == FIRST["loading"] == bound("selection", {"selection": 5.0}, None)
    assert bound("step", {}, None) == FIRST["step"] and bound("save", {}, None) == FIRST["save"]
    assert bound("final", {}, None) == FIRST["final"] and bound("final", {"save": 200.0}, None) == 800.0
    assert bound("step", {"step": 2.0}, None) == LATER_FLOOR  # short steps: the floor
    assert bound("step", {"step": 200.0}, None) == 800.0 and bound("save", {"save": 100.0}, None) == 400.0
    assert bound("step", {"step": 200.0}, 20) == bound("loading", {}, 20) == 20.0  # the recipe's key, every section



def test_the_environment_is_read_at_each_call_after_os_environ_is_rebound(monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' ``map(num_proc=N)`` (LLaMA-Factory's preprocessing with workers) rebinds ``os.environ`` to a copy and
    keeps it: the start bound and the store's address read the environment of the call (a default argument bound the
    object of the import, so a later variable went unseen and the start bound stayed 600 s)."""
    monkeypatch.setattr(os, "environ", copy.deepcopy(os.environ))
    monkeypatch.setenv(job_store.START_ENV, "7")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert job_store.start_bound() == 7.0
    assert job_store.address() == ("node0", 29511)

@pytest.fixture
def server() -> Any:
    """A real TCPStore in this process, as torchrun's agent hosts the job's store."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)


def _dog(server: Any, rank: int, world: int = 2, timeout: float | None = 1.0, store: Any = None,
         keys: job_store.Keys | None = None, **more: Any) -> Watchdog:
    """Rank ``rank`` of a job of ``world`` ranks, one a node (node<rank> on host node<rank>)."""
    client = store or job_store.client("127.0.0.1", server.port, 1.0)
    place = Place(rank, world, 0, f"node{rank}", world, f"node{rank}", f"127.0.0.1:{server.port}")
    return Watchdog(place, client, keys or job_store.launch_mark(client), timeout, ".", **more)


@pytest.fixture
def ends(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Short pulses; the lines said and ``os._exit`` caught (the exit raises SystemExit, which ends the calling thread
    alone, silently). ``ends["dogs"]``: watchdogs to stop at the end."""
    found: dict[str, Any] = {"said": [], "codes": [], "dogs": [], "exited": threading.Event()}

    def exit_(code: int) -> None:
        found["codes"].append(code)
        found["exited"].set()
        raise SystemExit(code)

    monkeypatch.setattr(watchdog, "pulse_for", lambda timeout: FAST)
    monkeypatch.setattr(watchdog, "NOTICE_S", 0.3)
    monkeypatch.setattr(watchdog, "say_apart", found["said"].append)
    monkeypatch.setattr(watchdog.os, "_exit", exit_)
    monkeypatch.setattr(threading, "excepthook", lambda _: None)
    yield found
    for dog in found["dogs"]:
        dog.stopped.set()
        for thread in dog.threads:
            if thread.is_alive():
                thread.join(1)  # a thread held in a store call that never returns is left (a daemon)


def _started(ends: dict[str, Any], *dogs: Watchdog) -> None:
    for dog in dogs:
        ends["dogs"].append(dog)
        dog.start()


def _freeze(dog: Watchdog) -> None:
    """As SIGSTOP: its threads stop where they are, its last beat stays (no ``left``). The stand-in stops its threads
    through ``stopped``, which a beat written meanwhile would report as the rank having left: its beats say what
    they said before instead (a frozen rank says nothing new)."""
    still = dog.beat()
    dog.beat = lambda: still
    dog.stopped.set()
    for thread in dog.threads:
        thread.join(5)
    dog.stopped = threading.Event()  # its beat does not say it left


def _wait_for(ends: dict[str, Any], count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(ends["codes"]) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_frozen_rank_is_named_by_the_monitor(server: Any, ends: dict[str, Any]) -> None:
    """Rank 1 freezes while loading (bound 1 s): rank 0's monitor names it unheard, says the line and ends; the
    line starts as the multi-node test reads it."""
    monitor = _dog(server, 0)
    frozen = _dog(server, 1)
    _started(ends, monitor, frozen)
    time.sleep(5 * FAST)
    assert ends["codes"] == []  # both pulse: nobody is named
    started = time.monotonic()
    _freeze(frozen)
    _wait_for(ends, 1)
    # never before the bound; the upper guard fits a loaded machine's late pulses (the order is the gate)
    assert ends["codes"] == [1] and 1.0 <= time.monotonic() - started < 10.0
    assert re.match(r"watchdog: rank 1 on node1, unheard for \d+ s in loading \(bound 1 s\): its process or host is "
                    r"frozen or gone\. Every rank exits", ends["said"][0]), ends["said"]
    assert "run the same command again" in ends["said"][0] and "\n" not in ends["said"][0]


def test_a_stuck_rank_is_named_and_ends_with_the_others(server: Any, ends: dict[str, Any]) -> None:
    """Both ranks in step 3; rank 0 finished its forward (two units of progress) and waits, rank 1 is alive but never
    moves: rank 0's monitor names rank 1 stuck; rank 1 reads the verdict in rank 0's beat, says it in its node's
    log and ends too."""
    dogs = [_dog(server, rank) for rank in (0, 1)]
    for dog in dogs:
        dog.enter("step 3", "step", 3)
    dogs[0].progress()
    dogs[0].progress()
    _started(ends, *dogs)
    _wait_for(ends, 2)
    assert ends["codes"] == [1, 1] and len(set(ends["said"])) == 1, ends["said"]
    assert re.match(r"watchdog: rank 1 on node1, no progress for \d+ s in step 3 \(bound 1 s\): alive but stuck",
                    ends["said"][0]), ends["said"]


def test_rank_0_frozen_is_named_by_every_other_rank(server: Any, ends: dict[str, Any]) -> None:
    monitor = _dog(server, 0)
    other = _dog(server, 1)
    _started(ends, monitor, other)
    time.sleep(5 * FAST)
    _freeze(monitor)
    _wait_for(ends, 1)
    assert ends["codes"] == [1]
    assert re.match(r"watchdog: rank 0 on node0, unheard for \d+ s in loading \(bound 1 s\)", ends["said"][0])


class _Hanging:
    """A store client that answers until ``hang`` is set, then never returns (its host frozen: TCPStore waits on)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.hang = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            if self.hang.is_set() and self.release.wait():
                raise RuntimeError("the test ended")
            return getattr(self.client, name)(*args)

        return call


def test_a_store_that_never_answers_ends_the_job_with_the_node_that_hosts_it(server: Any, ends: dict[str, Any]) -> None:
    """The first node frozen whole: torchrun's agent there, which hosts the job's store, stops with rank 0. Rank 1's
    store call never returns; its guard names rank 0 and the store, within rank 0's bound."""
    client = _Hanging(job_store.client("127.0.0.1", server.port, 1.0))
    monitor = _dog(server, 0)
    other = _dog(server, 1, store=client)
    _started(ends, monitor, other)
    time.sleep(5 * FAST)
    _freeze(monitor)
    client.hang.set()
    _wait_for(ends, 1)
    client.release.set()
    assert ends["codes"] == [1]
    assert re.match(rf"watchdog: rank 0 on node0, unheard for \d+ s in loading \(bound 1 s\): its process or host is "
                    rf"frozen or gone; the job's store at 127.0.0.1:{server.port} does not answer either \(rank 1 is "
                    rf"in loading\)", ends["said"][0]), ends["said"]


def test_an_earlier_launchs_rank_is_neither_heard_nor_taken_for_this_launchs(
        server: Any, ends: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of the launch before (a node thawed into this start) still runs and writes under its own launch's mark;
    this launch's rank 1 never starts: rank 0 names it never heard (the start bound, here 1 s), not taken in by the
    old one's beats nor by its leaving."""
    monkeypatch.setenv(job_store.START_ENV, "1")
    old = _dog(server, 1, keys=job_store.Keys(f"{job_store.ROOT}/earlier/"))
    monitor = _dog(server, 0)
    assert monitor.keys != old.keys
    _started(ends, old, monitor)
    time.sleep(5 * FAST)
    old.stop()
    _wait_for(ends, 1)
    assert ends["codes"] == [1] and "rank 1, never heard in this launch" in ends["said"][0], ends["said"]


class _Gone:
    """The store of a job that ended: every call fails."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            raise RuntimeError("Connection reset by peer")

        return call


def test_a_rank_thawed_after_the_job_ended_says_so_and_ends(server: Any, ends: dict[str, Any]) -> None:
    """Its collective fails as it goes on (gloo: the peers are gone) and it was stopped itself: one line says it was
    stopped, that the job ended meanwhile, and the process ends (no traceback). Not stopped: a line says which
    collective failed and the error goes on. An error that is no collective's: nothing."""
    dog = _dog(server, 1, store=_Gone(), keys=job_store.Keys("k/"))
    dog.enter("step 3", "step", 3)
    dog.guarded -= 10.0  # its guard's tick is overdue: it was stopped
    with pytest.raises(SystemExit):
        dog.ended_meanwhile(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [1.2.3.4]:5"))
    assert ends["codes"] == [1]
    assert re.match(r"watchdog: rank 1 on node1 was stopped \(its process or host frozen\) and went on 10 s later; "
                    r"meanwhile the job ended: its collective failed \(\[gloo.*:5\)\. Rank 1 ends \(exit 1\)",
                    ends["said"][0]), ends["said"]
    dog = _dog(server, 1, store=_Gone(), keys=job_store.Keys("k/"))
    dog.enter("step 3", "step", 3)
    dog.ended_meanwhile(RuntimeError("Connection reset by peer"))
    assert ends["said"][1] == ("watchdog: rank 1 on node1: a collective in step 3 failed (Connection reset by peer): "
                               "another rank's process or node ended, or the network between them failed.")
    dog.ended_meanwhile(ValueError("a bug"))
    assert len(ends["said"]) == 2 and ends["codes"] == [1]


def test_the_line_is_a_line_of_its_own_after_a_progress_bar(capsys: pytest.CaptureFixture) -> None:
    print("step 3/5 |####      | 60%\r", end="", flush=True)  # tqdm's bar, its line left open
    log.say_apart("watchdog: rank 1 on node1, unheard for 21 s")
    assert capsys.readouterr().out.endswith("\r\n[llamafactory-hera] watchdog: rank 1 on node1, unheard for 21 s\n")


class _Recorder:
    """A watchdog as sections.py sees one: every section entered and the progress in it."""

    def __init__(self) -> None:
        self.state = Where("loading", SectionKind.LOADING, 0)
        self.entered = []
        self.count = 0

    def enter(self, section: str, kind: str, step: int | None = None) -> None:
        self.state = Where(section, kind, self.state.step if step is None else step)
        self.count = 0
        self.entered.append(self.state)

    def progress(self) -> None:
        self.count += 1

    def reached(self, point: str) -> None:
        self.count += 1

    def where(self) -> Where:
        return self.state


def test_sections_give_back_the_one_before_and_count_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section block ends in the section before it; ``forwards`` counts every module's forward in the block;
    ``counting_forwards`` counts a model's forward twice (begun, done); none of it when the run is not watched."""
    dog = _Recorder()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with sections.counting_forwards(model):  # not watched: no hook
        model(torch.ones(1, 2))
    monkeypatch.setattr(sections, "_running", [dog])
    sections.enter("step 3", "step", 3)
    with sections.counting_forwards(model):
        model(torch.ones(1, 2))
    assert dog.count == 2
    with sections.section("the teacher's pass before step 1", "teacher", forwards=True):
        model(torch.ones(1, 2))
        assert dog.state == ("the teacher's pass before step 1", "teacher", 3) and dog.count == 3  # 3 modules
    assert dog.state == ("step 3", "step", 3)
    model(torch.ones(1, 2))
    assert dog.count == 0  # the hooks are gone


def test_a_run_is_watched_unless_its_key_is_0_and_its_ranks_leave_through_a_watched_barrier(
        server: Any, ends: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``<prefix>_watchdog_timeout`` unset watches a run of several processes (the store at MASTER_ADDR:MASTER_PORT
    here, no process group); 0 turns it off; one process is never watched. The ranks leave the block through a
    barrier, in a ``wait`` section, still watched; a block that raises leaves without it."""
    barriers: list[tuple[str, str, int]] = []
    group = [False]  # whether a process group runs: none while the watchdog finds its store, one at the barrier
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setattr(watchdog.dist, "is_initialized", lambda: group[0])
    monkeypatch.setattr(watchdog.dist, "barrier", lambda: barriers.append(sections._running[0].where()))
    args = type("Args", (), {"world_size": 2, "process_index": 0, "local_process_index": 0, "output_dir": "."})()
    with watchdog.watching(args, None):
        dog = sections._running[0]
        assert isinstance(dog, Watchdog) and dog.threads[0].is_alive()
        group[0] = True
    group[0] = False
    assert barriers == [("the last barrier (every rank's end)", "wait", 0)] and sections._running == []
    assert not dog.threads[0].is_alive() and json.loads(server.get(dog.keys.beat(0)))["left"]
    with pytest.raises(KeyError), watchdog.watching(args, None):
        raise KeyError("a bug")
    assert len(barriers) == 1
    args.world_size = 1
    for world, timeout in ((2, 0), (1, None)):
        args.world_size = world
        with watchdog.watching(args, timeout):
            assert sections._running == []


@pytest.mark.parametrize("parse,key", [(parse_hera_arguments, "hera_watchdog_timeout"),
                                       (parse_harc_arguments, "harc_watchdog_timeout")])
def test_the_key(parse: Any, key: str) -> None:
    base = {"hera_heads": ["L0H0"]} if key.startswith("hera") else {"harc_harmful": "h", "harc_harmless": "s",
                                                                     "harc_pseudo": "p"}
    assert getattr(parse(base), key) is None and getattr(parse({**base, key: "20"}), key) == 20.0
    with pytest.raises(RecipeError, match=f"{key}: got -1; allowed range is >= 0"):
        parse({**base, key: -1})
