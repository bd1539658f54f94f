"""The rank that stopped first, named alone with its host and point, in a line that stays short at any scale
(llamafactory_hera/training/watch_judge.py), on fake beats and a fake clock: a rank stuck before its backward while
the others wait in the next collective, one hung rank, one frozen rank, a frozen node and a mix among 1,024 and
4,096 ranks, and every rank stopped at the same point (said only then)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from llamafactory_hera.training import watch_lines
from llamafactory_hera.training.watch_judge import STORAGE_BOUND, Judge, described

BOUND = 30.0
LONGEST = 400  # characters of the line that names them, at any scale
PER_HOST = 8
# a step's points, in order: (count in step 7, the point it leaves a rank at)
BEFORE_BACKWARD = (10, "after its forward, before its backward")
BACKWARD = (11, "in its backward")
AFTER_BACKWARD = (12, "after its backward")


def host(rank: int) -> str:
    return f"gpu-node-{rank // PER_HOST:04d}.cluster"


def beat(pulse: int, point: tuple[int, str], rank: int, section: str = "step 7", **more: Any) -> bytes:
    return json.dumps({"host": host(rank), "section": section, "kind": "step", "bound": BOUND, "pulse": pulse,
                       "position": [7, 4, point[0]], "point": point[1], **more}).encode()


def judged(world: int, beat_of: Callable[[int, int], bytes | None], first_bound: float = 600) -> Judge:
    """Every rank's beat read every 5 s up to t = 40, as ``beat_of(rank, t)`` says (None: nothing read)."""
    judge = Judge(list(range(world)), now=0.0, first_bound=first_bound)
    for t in range(0, 41, 10):
        for rank in range(world):
            judge.observe(rank, beat_of(rank, t), float(t))
    return judge


def line(judge: Judge, now: float) -> tuple[list[tuple[int, str]], str]:
    named = judge.named(now)
    return [(entry.rank, entry.why) for entry in named], described(named)


def test_a_rank_stuck_before_its_backward_is_named_alone_not_the_rank_waiting_in_ddps_all_reduce() -> None:
    """Rank 1 is alive but stopped after its forward; rank 0 went on into its backward and waits in DDP's gradient
    all-reduce (its backward's end): rank 0 is ahead, so rank 1 alone is named, with where it stopped."""
    judge = judged(2, lambda rank, t: beat(t, AFTER_BACKWARD if rank == 0 else BEFORE_BACKWARD, rank))
    named, text = line(judge, 31.0)
    assert named == [(1, "stuck")]
    assert text == ("rank 1 on gpu-node-0000.cluster, no progress for 31 s in step 7 (bound 30 s): alive but stuck "
                    "after its forward, before its backward (a kernel, a collective, a lost peer of NCCL)")


def test_every_rank_stopped_at_the_same_point_is_said_only_when_true() -> None:
    """Both ranks in the same collective, neither ahead: said. One of three ranks done (in the last barrier) while
    two stand at the same point: they are named, but not as every rank."""
    judge = judged(2, lambda rank, t: beat(t, BACKWARD, rank))
    named, text = line(judge, 31.0)
    assert named == [(0, "stuck"), (1, "stuck")]
    assert text.endswith("; every rank stopped at the same point: a collective that does not complete")

    def one_done(rank: int, t: int) -> bytes:
        if rank == 2:
            return json.dumps({"host": host(2), "section": "the last barrier", "kind": "wait", "bound": BOUND,
                               "pulse": t, "position": [7, 7, 0]}).encode()
        return beat(t, BACKWARD, rank)

    named, text = line(judged(3, one_done), 31.0)
    assert named == [(0, "stuck"), (1, "stuck")] and "every rank" not in text, text


def hung(culprit: int, point: tuple[int, str] = BEFORE_BACKWARD) -> Callable[[int, int], bytes]:
    """``culprit`` stopped at ``point``; the others went on and wait at their backward's end (DDP's all-reduce)."""
    return lambda rank, t: beat(t, point if rank == culprit else AFTER_BACKWARD, rank)


def moving(rank: int, t: int, **more: Any) -> bytes:
    """A rank that pulses and moves on."""
    return beat(t, (10 + t, "in its backward"), rank, **more)


def frozen(ranks: set[int], at: int = 10) -> Callable[[int, int], bytes]:
    """``ranks`` stop pulsing and moving at ``at`` (their process or host frozen); the others move on."""
    return lambda rank, t: beat(at, BACKWARD, rank) if rank in ranks and t >= at else moving(rank, t)


def mixed(world: int) -> Callable[[int, int], bytes | None]:
    """A frozen node (ranks 16-23), a rank never heard (77), a rank whose output_dir does not answer (3000 % world)
    and one frozen in a save (4000 % world): the others move on."""

    def beat_of(rank: int, t: int) -> bytes | None:
        if rank == 77:
            return None
        if rank == 3000 % world:
            return moving(rank, t, storage=STORAGE_BOUND + 1)
        if rank == 4000 % world and t >= 10:
            return beat(10, AFTER_BACKWARD, rank, section="the save of checkpoint-7")
        return frozen(set(range(16, 24)))(rank, t)

    return beat_of


@pytest.mark.parametrize("world", [1024, 4096])
def test_at_scale_the_culprit_is_named_in_a_short_line(world: int) -> None:
    """One hung rank, one frozen rank, a frozen node of 8 and a mix, among ``world`` ranks on 8-rank hosts: each
    line names the rank (or its range) and host, and stays under 400 characters."""
    culprit = world // 2 + 3
    named, text = line(judged(world, hung(culprit)), 41.0)
    assert named == [(culprit, "stuck")] and f"rank {culprit} on {host(culprit)}," in text
    assert "before its backward" in text and len(text) < LONGEST, text
    lengths = {"hung": len(text)}

    named, text = line(judged(world, frozen({culprit})), 41.0)
    assert named == [(culprit, "unheard")] and f"rank {culprit} on {host(culprit)}, unheard" in text
    lengths["frozen"] = len(text)

    node = set(range(world - PER_HOST, world))
    named, text = line(judged(world, frozen(node)), 41.0)
    assert named == [(rank, "unheard") for rank in sorted(node)]
    assert text.startswith(f"ranks {world - PER_HOST}-{world - 1} on {host(world - 1)}, unheard for 31 s"), text
    lengths["node"] = len(text)

    named, text = line(judged(world, mixed(world), first_bound=35), 41.0)
    assert {rank for rank, _ in named} == {*range(16, 24), 4000 % world, 77, 3000 % world}, named
    assert f"ranks 16-23 on {host(16)}, unheard" in text and "rank 77, never heard" in text, text
    assert text.endswith(" more ranks named for other reasons or sections"), text
    lengths["mix"] = len(text)

    named, text = line(judged(world, lambda rank, t: beat(t, BACKWARD, rank)), 41.0)
    assert len(named) == world and text.startswith(f"ranks 0-{world - 1} on {host(0)}, {host(8)}, {host(16)} and "
                                                   f"{world // PER_HOST - 3} more hosts, no progress"), text
    assert "every rank stopped at the same point" in text
    lengths["all"] = len(text)
    lengths = {case: len(watch_lines.ending("x" * length)) for case, length in lengths.items()}  # the job's whole line
    assert max(lengths.values()) < LONGEST, lengths
    print(f"{world} ranks: the line's characters {lengths}; the job's last line around the 'all' one "
          f"{len(watch_lines.ending(text))}")


def test_ranks_far_apart_are_counted_not_listed() -> None:
    """Every other rank of 4,096 frozen: the first ranges, how many more, and the count."""
    judge = judged(4096, lambda rank, t: beat(t if rank % 2 else 0, BACKWARD if rank % 2 else (9, "in its forward"),
                                               rank))
    named, text = line(judge, 41.0)
    assert len(named) == 2048 and len(text) < LONGEST, text
    assert re.match(r"ranks 0, 2, 4 and 2045 more ranges \(2,048 ranks\) on gpu-node-0000\.cluster, gpu-node-0001"
                    r"\.cluster, gpu-node-0002\.cluster and 509 more hosts, unheard for 41 s", text), text
