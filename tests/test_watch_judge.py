"""What the watchdog's monitor names (llamafactory_hera/training/watch_judge.py), on a fake clock and fake beats: a
frozen rank, a stuck one and not those waiting for it, a collective every rank is stuck in, a slow rank that still
moves, waiting and loading ranks, a storage stall, a beat that cannot be read, a rank never heard, the line."""

from __future__ import annotations

import json
import re
from typing import Any

from llamafactory_hera.training.watch_judge import PLACEHOLDER, STORAGE_BOUND, Judge, described


def beat(pulse: int, position: list[int] | None = None, kind: str = "step", bound: float = 30, host: str = "node-b",
         section: str = "step 3", **more: Any) -> bytes:
    return json.dumps({"host": host, "section": section, "kind": kind, "bound": bound, "pulse": pulse,
                       "position": position if position is not None else [3, 4, 0], **more}).encode()


def named(judge: Judge, now: float) -> list[tuple[int, str]]:
    return [(entry.rank, entry.why) for entry in judge.named(now)]


def test_a_frozen_rank_is_named_and_the_live_ones_are_not() -> None:
    """Rank 1 pulses and moves throughout; rank 2's pulses stop at t = 20 (a frozen process: its thread stops with
    it): named once unheard for longer than its bound, not before, and rank 1 is never named."""
    judge = Judge([1, 2], now=0.0, first_bound=600)
    for t in range(0, 51, 5):
        judge.observe(1, beat(t, [3, 4, t]), float(t))
        judge.observe(2, beat(min(t, 20), [3, 4, min(t, 20)], host="node-c"), float(t))
        assert named(judge, float(t)) == [], t
    assert named(judge, 50.0) == [] and named(judge, 51.0) == [(2, "unheard")]
    entry = judge.named(51.0)[0]
    assert entry.seconds == 31.0
    assert described([entry]) == ("rank 2 on node-c, unheard for 31 s in step 3 (bound 30 s): its process or host is "
                                  "frozen or gone")


def test_a_stuck_rank_is_named_and_the_ranks_waiting_for_it_are_not() -> None:
    """Rank 2 is alive (its pulse goes on) but stuck in its forward of step 3 (position 1: the forward begun); ranks
    0 and 1 finished theirs (position 2) and wait for it in the step's collective. After the bound only rank 2 is
    named, as stuck; the others stopped moving too, but they are ahead of it."""
    judge = Judge([0, 1, 2], now=0.0, first_bound=600)
    for t in range(0, 41, 5):
        for rank in (0, 1):
            judge.observe(rank, beat(t, [3, 4, 2]), float(t))
        judge.observe(2, beat(t, [3, 4, 1], host="node-c"), float(t))
    assert named(judge, 30.0) == [] and named(judge, 31.0) == [(2, "stuck")]
    assert described(judge.named(31.0)).startswith("rank 2 on node-c, no progress for 31 s in step 3 (bound 30 s): "
                                                   "alive but stuck")


def test_ranks_stuck_at_the_same_point_are_named_together_as_a_collective_that_does_not_complete() -> None:
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 41, 5):
        for rank in (0, 1):
            judge.observe(rank, beat(t, [3, 4, 2]), float(t))
    assert named(judge, 31.0) == [(0, "stuck"), (1, "stuck")]
    assert "ranks 0, 1 on node-b" in described(judge.named(31.0))
    assert "every rank stopped at the same point: a collective that does not complete" in described(judge.named(31.0))


def test_a_slow_rank_that_still_moves_holds_back_the_ranks_waiting_for_it() -> None:
    """Rank 0 is still in the save of checkpoint-4 (a stage done every 25 s, bound 30) while ranks 1 and 2 began
    step 5 and wait for it in its first collective for 200 s: nobody is named. Then rank 0 stops moving: it is
    named, they are not."""
    judge = Judge([0, 1, 2], now=0.0, first_bound=600)
    save = {"kind": "save", "section": "the save of checkpoint-4"}
    for t in range(0, 231, 5):
        judge.observe(0, beat(t, [4, 5, min(t, 200) // 25], host="node-a", **save), float(t))
        for rank in (1, 2):
            judge.observe(rank, beat(t, [5, 4, 1], section="step 5"), float(t))
        assert named(judge, float(t)) == [], t
    assert named(judge, 231.0) == [(0, "stuck")]


def test_ranks_waiting_for_a_stuck_one_are_not_named_and_loading_ones_hold_the_others_back() -> None:
    """Head selection: rank 0 scores (kind ``selection``), ranks 1 and 2 wait for it (``wait``: their phase is past
    every other); rank 0 stops moving: it alone is named. And a rank still loading (within its bound) holds back the
    naming of a rank that waits for it in the teacher's pass."""
    judge = Judge([0, 1, 2], now=0.0, first_bound=600)
    for t in range(0, 41, 5):
        judge.observe(0, beat(t, [0, 1, 7], kind="selection", section="head selection", host="node-a"), float(t))
        for rank in (1, 2):
            judge.observe(rank, beat(t, [0, 7, 0], kind="wait", section="head selection"), float(t))
    assert named(judge, 31.0) == [(0, "stuck")]
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 101, 5):
        judge.observe(0, beat(t, [0, 3, 0], kind="teacher", section="the teacher's pass"), float(t))
        judge.observe(1, beat(t, [0, 0, 0], kind="loading", section="loading", bound=1800), float(t))
    assert named(judge, 100.0) == []


def test_a_beat_that_cannot_be_read_changes_nothing_and_only_its_rank_says_it_left() -> None:
    """A read that fails (None: a timed-out or refused store call, a key not there; or a value that does not parse,
    as a stale handle's garbage would be) is not an end: the rank stays watched and is named once silent for its
    bound. A rank is left alone only when its own last beat says it left the run."""
    judge = Judge([1, 2], now=0.0, first_bound=600)
    judge.observe(1, beat(1), 0.0)
    judge.observe(2, beat(1), 0.0)
    for t in range(5, 61, 5):
        judge.observe(1, None, float(t))
        judge.observe(1, b"\x00garbage", float(t))
        judge.observe(1, PLACEHOLDER, float(t))
    judge.observe(2, beat(2, left=True), 5.0)
    assert named(judge, 31.0) == [(1, "unheard")]


def test_a_storage_stall_is_not_a_peers_silence() -> None:
    """A 10-minute stall of output_dir's file system in a save: every rank's progress stops, their beats go on and
    say their probe of output_dir has waited (``storage``, seconds). Nobody is named through it (bound 30 s); a probe
    unanswered for longer than STORAGE_BOUND names the rank for that."""
    judge = Judge([0, 1], now=0.0, first_bound=600)
    save = {"kind": "save", "section": "the save of checkpoint-4"}
    for t in range(0, 601, 5):
        stall = max(0.0, t - 10.0)
        for rank in (0, 1):
            judge.observe(rank, beat(t, [4, 5, 1], storage=stall, **save), float(t))
        assert named(judge, float(t)) == [], t
    for t in range(605, 660, 5):  # it answers again; the save goes on
        for rank in (0, 1):
            judge.observe(rank, beat(t, [4, 5, 1 + t], **save), float(t))
        assert named(judge, float(t)) == [], t
    judge.observe(0, beat(999, [4, 5, 1], storage=STORAGE_BOUND + 1, **save), 700.0)
    assert (0, "storage") in named(judge, 700.0)


def test_a_rank_never_heard_is_named_after_the_first_bound_and_the_monitors_own_pause_is_not_silence() -> None:
    judge = Judge([0, 1], now=0.0, first_bound=60)
    for t in range(0, 61, 5):
        judge.observe(0, beat(t, [0, 0, 0], kind="loading", bound=1800), float(t))
    assert named(judge, 60.0) == [] and named(judge, 61.0) == [(1, "never")]
    assert described(judge.named(61.0)) == ("rank 1, never heard in this launch (61 s, bound 60 s): its run did not "
                                            "start (its node's launcher, or an error before the run)")
    judge = Judge([1], now=0.0, first_bound=600)
    judge.observe(1, beat(1), 0.0)
    judge.paused(1000.0)  # the monitor was stopped itself for 1000 s
    assert named(judge, 1020.0) == [] and named(judge, 1031.0) == [(1, "unheard")]


def test_one_clause_per_reason_and_section_with_its_hosts() -> None:
    judge = Judge([2, 3, 4, 5], now=0.0, first_bound=600)
    for rank in (2, 3):
        judge.observe(rank, beat(1, host="node-b", section="the save of checkpoint-4", bound=900), 0.0)
    judge.observe(4, beat(1, host="node-c", bound=900), 0.0)
    judge.observe(5, beat(1, host="node-d", section="the save of checkpoint-4", bound=900), 0.0)
    text = described(judge.named(905.0))
    assert re.fullmatch(r"ranks 2, 3, 5 on node-b, node-d, unheard for 905 s in the save of checkpoint-4 \(bound 900 "
                        r"s\): its process or host is frozen or gone; rank 4 on node-c, unheard for 905 s in step 3 "
                        r"\(bound 900 s\): its process or host is frozen or gone", text), text


def _loading(pulse: int, moves: int, collective: bool, host: str = "node-b") -> bytes:
    """A loading rank's beat: ``moves`` counts its main thread's moves; ``collective``: it waits in one."""
    return beat(pulse, [0, 0, moves], kind="loading", section="loading", bound=30, host=host, collective=collective)


def test_a_rank_stuck_in_its_load_is_named_when_another_waits_for_it_in_a_collective() -> None:
    """LLaMA-Factory's load: rank 0 preprocesses the data (its main thread moves) while ranks 1 and 2 wait in the
    barrier of ``main_process_first`` (a collective, not moving): nobody is named, whatever the time. Rank 0 stops
    moving at t = 100 (outside a collective): named alone once its bound has passed, the waiting ranks never."""
    judge = Judge([0, 1, 2], now=0.0, first_bound=600)
    for t in range(0, 161, 5):
        judge.observe(0, _loading(t, min(t, 100), False, host="node-a"), float(t))
        for rank in (1, 2):
            judge.observe(rank, _loading(t, 3, True), float(t))
        if t <= 130:
            assert named(judge, float(t)) == [], t
    assert named(judge, 131.0) == [(0, "stuck")]
    assert re.match(r"rank 0 on node-a, no progress for 31 s in loading \(bound 30 s\): alive but stuck",
                    described(judge.named(131.0)))


def test_ranks_that_all_load_slowly_are_never_named_and_all_waiting_are_named_together() -> None:
    """Every rank's main thread stands still in a load of its own (one long read of a shard, no rank in a
    collective): a slow load looks like this, so nobody is named. Every rank waiting in a collective of the load
    that never completes: all named, as a collective that does not complete."""
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 301, 5):
        for rank in (0, 1):
            judge.observe(rank, _loading(t, 2, False), float(t))
    assert named(judge, 300.0) == []
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 41, 5):
        judge.observe(0, _loading(t, 9, True), float(t))
        judge.observe(1, _loading(t, 2, True), float(t))
    assert named(judge, 36.0) == [(0, "stuck"), (1, "stuck")]
    assert "every rank stopped at the same point" in described(judge.named(36.0))
