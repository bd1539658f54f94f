"""Nothing the plugin sets ends a rank before its watchdog (llamafactory_hera/training/watchdog.py) names one: every
process group keeps the timeout it was made with through every section (a real one-rank gloo group), a ``ddp_timeout``
of the user's under the watchdog's bounds is said at the start, and a collective that fails is said in the section it
failed in, not the one a section block restored after it. docs/multinode.md, "What the plugin sets on torch"."""

from __future__ import annotations

import re
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from watch_fakes import Clock, FakeStore, dog

from llamafactory_hera.training import sections, watchdog
from llamafactory_hera.training.sections import SectionKind

USERS = timedelta(seconds=4321)  # a ddp_timeout no default of torch's has


def _timeout(group: Any) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def test_every_group_waits_at_least_as_long_as_ddp_timeout_from_the_first_step() -> None:
    """The default group keeps ``ddp_timeout`` through every kind of section, each step and save again, and the end. A
    group made shorter (as DeepSpeed's copy of the world group and FSDP2's 2-D meshes are, with torch's default: 10
    minutes under NCCL, under the watchdog's first bounds) waits as long as ``ddp_timeout`` from the first step on,
    when the Trainer has made its engine's groups; a longer one keeps its own. No timeout is ever shortened."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=USERS)
    try:
        shorter = dist.new_group([0], timeout=timedelta(seconds=1234))
        longer = dist.new_group([0], timeout=timedelta(seconds=9999))
        watched = dog(FakeStore(), Clock(), 0, world=1, timeout=None)
        for step in (1, 2):
            for kind in SectionKind:
                watched.enter(f"a {kind} section", kind, step)
                stepped = step > 1 or kind.place >= SectionKind.STEP.place
                expected = (USERS, USERS if stepped else timedelta(seconds=1234), timedelta(seconds=9999))
                assert (_timeout(dist.group.WORLD), _timeout(shorter), _timeout(longer)) == expected, kind
        watched.stop()
        assert _timeout(dist.group.WORLD) == USERS
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("ddp_timeout", "timeout", "warned"), [
    (1800, None, True),  # transformers' default under the 1,800 s load bound: a hung load ends unnamed at 1,800 s
    (180000000, None, False),  # LLaMA-Factory's examples and the shipped recipes
    (None, None, False),
    (60, 20.0, False),  # 20 s, 4 pulses of 5 s, 3 s for every node's log: 43 s
    (40, 20.0, True),
])
def test_a_ddp_timeout_under_the_watchdogs_bounds_is_said_on_rank_0(
        ddp_timeout: int | None, timeout: float | None, warned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(watchdog, "job_client", lambda pulse: FakeStore())
    monkeypatch.setattr(watchdog.Watchdog, "start", lambda self: None)
    monkeypatch.setattr(watchdog, "say", said.append)
    for rank in (1, 0):
        args = SimpleNamespace(world_size=2, process_index=rank, local_process_index=rank, output_dir=".",
                               ddp_timeout=ddp_timeout)
        watchdog._started(args, timeout)
    assert len(said) == warned
    if warned:
        naming = (timeout or 1800) + 4 * 5 + 3
        assert said[0] == (
            f"warning: ddp_timeout: {ddp_timeout} s is shorter than the watchdog's time to name a hung rank (up to "
            f"{naming:.0f} s): torch ends a hung collective first, without naming the rank that stopped. Set "
            "ddp_timeout: 180000000 (as LLaMA-Factory's examples and the shipped recipes do).")


def test_a_failed_collective_is_said_in_the_section_it_failed_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``watching()``, as a run leaves it on the error: a collective that fails in the save of checkpoint-4 (a
    section block, which restores step 4 as the error leaves it) is said in the save; one that fails in step 5 itself,
    in step 5; an error that is no collective's says nothing and goes on as it was."""
    said: list[str] = []
    watched = dog(FakeStore(), Clock(), 1)
    monkeypatch.setattr(watchdog, "_started", lambda args, timeout: watched)
    monkeypatch.setattr(watchdog, "say_apart", said.append)
    args = SimpleNamespace(world_size=2)
    reset = RuntimeError("Connection reset by peer")
    with pytest.raises(RuntimeError), watchdog.watching(args, None):
        sections.enter("step 4", "step", 4)
        with sections.section("the save of checkpoint-4", "save"), sections.section("its rng states", "save"):
            raise reset
    with pytest.raises(RuntimeError), watchdog.watching(args, None):
        with sections.section("the save of checkpoint-4", "save"):
            pass
        sections.enter("step 5", "step", 5)
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [1.2.3.4]:5")
    with pytest.raises(KeyError), watchdog.watching(args, None):
        with sections.section("the save of checkpoint-5", "save"):
            raise KeyError("a bug")
    assert [re.sub(r" \(.*\): ", " (...): ", line) for line in said] == [
        "watchdog: rank 1 on node1: a collective in its rng states failed (...): another rank's process or node ended, "
        "or the network between them failed.",
        "watchdog: rank 1 on node1: a collective in step 5 failed (...): another rank's process or node ended, or the "
        "network between them failed."]
    assert watched.where() == ("step 5", "step", 5) and sections._running == []
