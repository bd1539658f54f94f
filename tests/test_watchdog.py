"""The watchdog of a plugin run's ranks (llamafactory_hera/training/watchdog.py): its bounds and the line on a fake
clock and fake heartbeats, its thread on real files in this process, and its key. A node frozen in a step of a real
launch: tests/test_multinode.py."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from llamafactory_hera.harc.config import parse_harc_arguments
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.training import watchdog
from llamafactory_hera.training.watchdog import FIRST, LATER_FLOOR, Watch, Watchdog, bound, ending_line
from llamafactory_hera_patches.errors import RecipeError


def test_bounds_first_then_from_the_last_section() -> None:
    assert bound("loading", None, None) == FIRST["loading"] == bound("head selection", 5.0, None)
    assert bound("step", None, None) == FIRST["step"] and bound("save", None, None) == FIRST["save"]
    assert bound("step", 2.0, None) == LATER_FLOOR  # short steps: the floor
    assert bound("step", 200.0, None) == 800.0 and bound("save", 100.0, None) == 400.0
    assert bound("step", 200.0, 20) == bound("loading", None, 20) == 20.0  # the recipe's key, every section


def beat(section: str, bound_s: float, pulse: int, host: str = "node-b", launch: str = "") -> bytes:
    return json.dumps({"host": host, "section": section, "bound": bound_s, "pulse": pulse, "launch": launch}).encode()


def test_a_frozen_rank_is_named_and_the_live_ones_are_not() -> None:
    """Rank 1 pulses throughout (a live rank waiting in a collective: its section does not move); rank 2 stops at
    t = 20 (a frozen process: its thread stops with it); silent once unheard for longer than its bound, not before."""
    watch = Watch([1, 2], now=0.0)
    for t in range(0, 51, 5):
        watch.observe(1, beat("step 3", 30, t), float(t))
        watch.observe(2, beat("step 3", 30, min(t, 20), host="node-c"), float(t))
        assert watch.silent(float(t)) == [], t
    assert watch.silent(50.0) == []
    silent = watch.silent(51.0)
    assert [(rank, seconds) for rank, _, seconds in silent] == [(2, 31.0)]
    line = ending_line(silent, 0)
    assert line.startswith("watchdog: rank 2 on node-c, unheard for 31 s in step 3 (bound 30 s): its process or "
                           "host is frozen or gone") and "Rank 0 ends (exit 1)" in line
    assert "run the same command again" in line and line.count("\n") == 0


def test_a_whole_node_is_one_line_naming_its_ranks() -> None:
    silent = [(2, json.loads(beat("the save of checkpoint-4", 900, 1)), 901.0),
              (3, json.loads(beat("the save of checkpoint-4", 900, 1)), 905.0)]
    assert ending_line(silent, 0).startswith("watchdog: ranks 2, 3 on node-b, unheard for 905 s in the save of "
                                             "checkpoint-4 (bound 900 s)")


def test_files_of_an_earlier_launch_and_ranks_that_ended_are_not_silent() -> None:
    watch = Watch([1, 2, 3], now=0.0)
    watch.observe(1, beat("step 40", 10, 57), 5.0)  # an earlier launch's file, never rewritten
    watch.observe(2, None, 5.0)  # no file yet ...
    watch.observe(2, beat("loading", 10, 1), 10.0)  # ... then this launch's: heard
    watch.observe(3, beat("loading", 10, 3), 5.0)
    watch.observe(3, beat("loading", 10, 4), 10.0)
    watch.observe(3, None, 15.0)  # its file removed: the rank ended
    watch.observe(2, b'{"host": "no', 15.0)  # a write caught half-way: no change
    assert [rank for rank, _, _ in watch.silent(100.0)] == [2]
    watch.paused(100.0)  # this rank was paused itself: the silence was its own
    assert watch.silent(105.0) == []


def test_a_peer_that_froze_before_the_first_read_is_told_by_its_launchs_mark() -> None:
    """Rank 1 froze before this rank first read its file (a short first step: seen on two simulated nodes), so its
    file never changes here; it carries this launch's mark (the process group's store, new in every launch), so it is
    watched from that read. Rank 2's file, left by the launch before (a requeue after a frozen node), is not."""
    watch = Watch([1, 2], now=0.0, launch="this")
    watch.observe(1, beat("step 2", 20, 3, launch="this"), 5.0)
    watch.observe(2, beat("step 2", 20, 3, launch="before"), 5.0)
    for t in (10.0, 15.0, 20.0, 25.0):
        watch.observe(1, beat("step 2", 20, 3, launch="this"), t)
        watch.observe(2, beat("step 2", 20, 3, launch="before"), t)
    assert watch.silent(24.0) == [] and [rank for rank, _, _ in watch.silent(26.0)] == [1]


def test_sections_are_timed_and_their_bounds_written() -> None:
    now = [0.0]
    dog = Watchdog(Path("unused"), 0, 2, None, clock=lambda: now[0], launch="mark")
    assert json.loads(dog.beat())["bound"] == FIRST["loading"]
    dog.enter("step 1", "step")
    now[0] = 100.0
    dog.enter("step 2", "step")
    assert json.loads(dog.beat()) | {"host": "", "pid": 0} == {"host": "", "pid": 0, "section": "step 2",
                                                                "bound": 400.0, "pulse": 2, "launch": "mark"}


class _Args:
    def __init__(self, folder: Path, rank: int) -> None:
        self.output_dir, self.process_index, self.world_size = str(folder), rank, 2


def _fake_exit(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list]:
    """The watchdog's line and ``os._exit`` caught: (set when it exits, what it said then its exit code); the exit
    raises SystemExit, which ends the watchdog's thread alone, silently."""
    ended, said = threading.Event(), []

    def exit_(code: int) -> None:
        said.append(code)
        ended.set()
        raise SystemExit(code)

    monkeypatch.setattr(watchdog, "say", said.append)
    monkeypatch.setattr(watchdog.os, "_exit", exit_)
    monkeypatch.setattr(threading, "excepthook", lambda _: None)  # the fake exit's SystemExit in the thread
    return ended, said


def test_the_thread_ends_a_rank_whose_peer_froze(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' watchdogs in this process on real files (pulses of 0.1 s, bound 1 s): rank 1's thread stops as a
    SIGSTOP would stop it (its file stays); rank 0's says the line and ends its process (here: its thread)."""
    monkeypatch.setattr(watchdog, "PULSE", 0.1)
    ended, said = _fake_exit(monkeypatch)
    frozen = Watchdog(tmp_path / watchdog.FOLDER, 1, 2, 1.0)
    with watchdog.watching(_Args(tmp_path, 0), 1.0):
        frozen.enter("step 3", "step")
        frozen.start()
        assert not ended.wait(2.0)  # both pulse: nobody is silent
        frozen.stopped.set()
        frozen.thread.join()
        assert ended.wait(5.0)
    assert said[-1] == 1 and re.match(r"watchdog: rank 1 on \S+, unheard for \d+ s in step 3 \(bound 1 s\)", said[0])
    assert sorted(p.name for p in (tmp_path / watchdog.FOLDER).iterdir()) == ["rank-1.json"]  # rank 0's removed


def test_the_ranks_leave_a_watched_run_together_still_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's block ends in a barrier while the watchdog still runs: rank 0 alone writes the final save, and a rank
    done before it waited there unwatched (two simulated nodes, HARC, rank 0 frozen in the final save: rank 1's
    launcher waited past 600 s). A block that raises (a refusal, a stop) ends without it."""
    barriers: list[int] = []
    monkeypatch.setattr(watchdog.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(watchdog.dist, "barrier", lambda: barriers.append(len(watchdog._running)))
    monkeypatch.setattr(watchdog, "launch_mark", lambda: "")
    with watchdog.watching(_Args(tmp_path, 0), 20.0):
        pass
    assert barriers == [1] and watchdog._running == []
    with pytest.raises(SystemExit), watchdog.watching(_Args(tmp_path, 0), 20.0):
        raise SystemExit(0)
    with watchdog.watching(_Args(tmp_path, 0), 0):  # the watchdog off: still together
        pass
    assert barriers == [1, 0]


@pytest.mark.parametrize("parse,key", [(parse_hera_arguments, "hera_watchdog_timeout"),
                                       (parse_harc_arguments, "harc_watchdog_timeout")])
def test_the_key(parse: Any, key: str) -> None:
    base = {"hera_heads": ["L0H0"]} if key.startswith("hera") else {"harc_harmful": "h", "harc_harmless": "s",
                                                                     "harc_pseudo": "p"}
    assert getattr(parse(base), key) is None and getattr(parse({**base, key: "20"}), key) == 20.0
    with pytest.raises(RecipeError, match=f"{key}: got -1; allowed range is >= 0"):
        parse({**base, key: -1})


def test_each_section_is_timed_under_its_own_kind() -> None:
    """A step of 200 s, then a save of 100 s: the next step's bound is 4 x the step's time and the next save's 4 x the
    save's (a section timed under the kind it leaves for would give the step the save's time)."""
    now = [0.0]
    dog = Watchdog(Path("unused"), 0, 2, None, clock=lambda: now[0])
    dog.enter("step 1", "step")
    now[0] = 200.0
    dog.enter("the save of checkpoint-1", "save")
    now[0] = 300.0
    dog.enter("step 2", "step")
    assert json.loads(dog.beat())["bound"] == 800.0
    now[0] = 310.0
    dog.enter("the save of checkpoint-2", "save")
    assert json.loads(dog.beat())["bound"] == 400.0


def test_a_section_block_gives_back_the_section_and_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A save inside step 3 (``section``): after it the rank is in step 3 again, bounded as a step, not as a save."""
    now = [0.0]
    dog = Watchdog(Path("unused"), 0, 2, None, clock=lambda: now[0])
    monkeypatch.setattr(watchdog, "_running", [dog])
    watchdog.enter("step 3", "step")
    with watchdog.section("the save of checkpoint-3", "save"):
        assert (dog.section, dog.kind) == ("the save of checkpoint-3", "save")
    assert (dog.section, dog.kind) == ("step 3", "step")


def test_a_rank_paused_itself_does_not_take_its_unchanged_peers_for_silent(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole job suspended, then resumed (every process stopped at once): this rank's thread finds its own clock
    1000 s on and its peer's file unchanged, the peer not yet running again. The silence was its own: no end. Then
    the peer stays unchanged for longer than its bound (1 s) on this rank's clock: the rank ends (the thread still
    watches). The thread's clock is a fake one the test moves a pulse at a time; its pulses of 0.05 s are real."""
    monkeypatch.setattr(watchdog, "PULSE", 0.05)
    (ended, said), reads = _fake_exit(monkeypatch), [0]
    folder, now = tmp_path / watchdog.FOLDER, [0.0]
    folder.mkdir()
    (folder / "rank-1.json").write_bytes(beat("step 3", 1, 1, launch="this"))
    running = threading.Event()  # the thread took its first time: a clock moved after that is seen

    def clock() -> float:
        if threading.current_thread() is not threading.main_thread():
            running.set()
        return now[0]

    dog = Watchdog(folder, 0, 2, None, clock=clock, launch="this")
    read = dog._read
    monkeypatch.setattr(dog, "_read", lambda rank: (reads.__setitem__(0, reads[0] + 1), read(rank))[1])

    def move_to(t: float) -> None:
        """The thread's clock at ``t``, then one read of the peer's file at that time."""
        before, now[0] = reads[0], t
        deadline = time.monotonic() + 5.0
        while reads[0] == before and not ended.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)

    dog.start()
    try:
        assert running.wait(5.0)
        move_to(0.1)  # read once: this launch's file
        assert reads == [1] and dog.watch.peers[1].heard
        move_to(1000.1)  # the job resumed: this rank's own gap of 1000 s
        assert not ended.is_set() and said == []
        for tenth in range(1, 10):  # 0.9 s of the bound, a pulse at a time
            move_to(1000.1 + tenth / 10)
        assert not ended.is_set() and said == []
        for tenth in range(10, 13):
            move_to(1000.1 + tenth / 10)
        assert ended.wait(5.0) and said[-1] == 1 and "unheard for 1 s in step 3" in said[0]
    finally:
        dog.stopped.set()
        dog.thread.join()


def test_the_last_rank_out_removes_the_folder(tmp_path: Path) -> None:
    """A rank's stop removes its heartbeat file, then the folder when it was the last one in it: a finished run
    leaves no watchdog folder in output_dir."""
    dog = Watchdog(tmp_path / watchdog.FOLDER, 0, 2, None)
    dog.start()
    assert [path.name for path in (tmp_path / watchdog.FOLDER).iterdir()] == ["rank-0.json"]
    dog.stop()
    assert list(tmp_path.iterdir()) == []


def test_every_rank_of_a_launch_gets_the_first_ranks_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch's mark is the first rank's, read by every other from the process group's store (the same on all);
    the next launch's store gives a new one."""
    store = dist.HashStore()
    monkeypatch.setattr(watchdog.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(watchdog.dist.distributed_c10d, "_get_default_store", lambda: store)
    marks = [watchdog.launch_mark() for _rank in range(3)]
    assert len(set(marks)) == 1 and len(marks[0]) == 32
    monkeypatch.setattr(watchdog.dist.distributed_c10d, "_get_default_store", lambda: dist.HashStore())
    assert watchdog.launch_mark() != marks[0]


def test_a_run_is_watched_unless_its_key_is_0(tmp_path: Path) -> None:
    """``<prefix>_watchdog_timeout`` unset (None: the bounds of :func:`bound`) watches the run; 0 turns it off; a
    single process is never watched."""
    with watchdog.watching(_Args(tmp_path, 0), None):
        assert len(watchdog._running) == 1 and (tmp_path / watchdog.FOLDER / "rank-0.json").is_file()
    assert watchdog._running == [] and not (tmp_path / watchdog.FOLDER).exists()
    single = _Args(tmp_path, 0)
    single.world_size = 1
    for args, timeout in ((_Args(tmp_path, 0), 0), (single, None)):
        with watchdog.watching(args, timeout):
            assert watchdog._running == [] and not (tmp_path / watchdog.FOLDER).exists()
