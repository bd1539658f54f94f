"""A launch watched from ``llamafactory-cli``'s first line (llamafactory_hera_patches/launch_watch.py): a master address
that does not resolve, a node that never joins (NNODES 2, one node started), a store no node reaches, ranks that never
start their run, each one line naming what is missing within the start bound (here 1 s), on a real TCPStore in this
process; the launcher's end of its torchrun in a small process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch.distributed as dist

from conftest import free_port
from llamafactory_hera.runtime import job_store, launch_watch
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.launch_watch import StartWatch


def test_a_master_address_that_does_not_resolve_is_one_line_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(RecipeError, match=r"^MASTER_ADDR=node0\.invalid does not resolve on this node \(\S+\): .*Set "
                                          r"MASTER_ADDR to the first node's host name or address"):
        launch_watch.check_master_address({"MASTER_ADDR": "node0.invalid"}, retry_s=0)
    assert time.monotonic() - started < 10
    launch_watch.check_master_address({"MASTER_ADDR": "127.0.0.1"})


def _watch(port: int, node: int, nodes: int, said: list[str], bound: float = 1.0) -> StartWatch:
    return StartWatch(("127.0.0.1", port), node, nodes, bound, said.append)


def _run(watch: StartWatch) -> None:
    watch.thread.start()
    watch.thread.join(20)
    assert not watch.thread.is_alive()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(launch_watch, "POLL_S", 0.1)
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)


def test_nnodes_2_with_one_node_started_names_the_node_missing(server: Any) -> None:
    said: list[str] = []
    watch = _watch(server.port, 0, 2, said)
    watch.expect(2)
    started = time.monotonic()
    _run(watch)
    assert 1.0 <= time.monotonic() - started < 5.0
    assert said == [f"watchdog: the launch did not start within 1 s (LLAMAFACTORY_HERA_START_TIMEOUT): 1 of NNODES=2 "
                    f"nodes joined the job at 127.0.0.1:{server.port}: node(s) 1 did not (never started, or stuck "
                    "before its launcher reached the store: see that node's log). The job ends (exit 1) instead of "
                    "waiting on the rendezvous; fix what is missing and run the same command again."]


def test_a_store_no_node_reaches_is_named_from_the_node_that_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1 started, node 0 not (or MASTER_ADDR / MASTER_PORT point elsewhere)."""
    monkeypatch.setattr(launch_watch, "POLL_S", 0.1)
    monkeypatch.setattr(job_store, "client", lambda host, port, timeout: (_ for _ in ()).throw(RuntimeError("refused")))
    said: list[str] = []
    watch = _watch(free_port(), 1, 2, said)
    _run(watch)
    assert len(said) == 1 and "node 1 (" in said[0] and "could not reach the job's store at 127.0.0.1:" in said[0]
    assert "node 0's launcher has not started" in said[0]


def test_ranks_that_never_start_their_run_and_the_first_nodes_line_in_every_nodes_log(server: Any) -> None:
    """Both nodes joined, 3 of 4 ranks started their watchdog: node 0's launcher names it at the bound and sets its
    line in the store; node 1's launcher, whose bound passes later, says that same line."""
    said: list[str] = [], []
    first = _watch(server.port, 0, 2, said[0])
    second = _watch(server.port, 1, 2, said[1], bound=30.0)
    for watch in (first, second):
        watch.expect(4)
    second.thread.start()
    keys = job_store.launch_mark(server)
    for _ in range(3):
        server.add(keys.started, 1)
    _run(first)
    second.thread.join(10)
    assert said[0] == said[1] and len(said[0]) == 1
    assert "every node joined, but 3 of 4 ranks started their run (the others are stuck before it" in said[0][0]


def test_a_launch_whose_nodes_joined_and_ranks_started_ends_its_watch(server: Any) -> None:
    said: list[str] = []
    watch = _watch(server.port, 0, 1, said, bound=30.0)
    watch.expect(0)  # a host stage, or the recipe's watchdog off: nodes only
    _run(watch)
    assert said == []


def test_the_launcher_ends_its_torchrun_and_itself() -> None:
    """In a process of its own (it ends its own children): its child (torchrun's place) gets SIGTERM, then the
    launcher exits 1 once the child is gone (SIGKILL after KILL_AFTER_S, shortened here)."""
    script = (
        "import subprocess, sys, time\n"
        "from llamafactory_hera.runtime import launch_watch\n"
        "launch_watch.KILL_AFTER_S = 0.5\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "launch_watch.end_launch('watchdog: the launch did not start')\n"
        "print('child', child.wait(), flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "child -15" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("\n[llamafactory-hera] watchdog: the launch did not start"), proc.stderr


def test_the_watch_lasts_the_launch_and_leaves_no_port_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's block: MASTER_PORT drawn where unset (LLaMA-Factory would draw its own, which the watch could
    not know) and given back after; the watch's thread ends with the block; none for an elastic node count."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("RDZV_ID", raising=False)
    with launch_watch.watching(lambda: free_port(), 2, 0) as start:
        assert start is not None and start.thread.is_alive() and start.address[1] == int(os.environ["MASTER_PORT"])
    start.thread.join(5)
    assert not start.thread.is_alive() and "MASTER_PORT" not in os.environ
    with launch_watch.watching(lambda: free_port(), None, 0) as start:
        assert start is None


def test_a_node_whose_node_0_says_nothing_judges_the_launch_itself(
        server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only node 0's launcher counts the nodes and ranks; node 1's reads its verdict. With no node 0 there (its
    launcher gone before the store's host), node 1 names it FOLLOW_S past its own bound (here 0.5 s)."""
    monkeypatch.setattr(launch_watch, "FOLLOW_S", 0.5)
    said: list[str] = []
    watch = _watch(server.port, 1, 2, said, bound=0.5)
    watch.expect(2)
    started = time.monotonic()
    _run(watch)
    assert time.monotonic() - started >= 1.0 and len(said) == 1
    assert f"1 of NNODES=2 nodes joined the job at 127.0.0.1:{server.port}: node(s) 0 did not" in said[0]


def test_accelerate_launch_of_a_multi_gpu_config_is_watched_on_its_agents_store(server: Any) -> None:
    """``accelerate launch`` (patches/.../accelerate_launch.py): after the recipe's checks, a start watch on
    ``main_process_ip:main_process_port``; it ends once every rank's watchdog started, the launch said started in the
    store. An elastic rendezvous: unwatched."""
    from llamafactory_hera_patches.accelerate_launch import watch_start

    run = SimpleNamespace(method=SimpleNamespace(one_process=False),
                          controls=SimpleNamespace(watched=True, watchdog_timeout=None))
    args = SimpleNamespace(main_process_ip="127.0.0.1", main_process_port=server.port, num_machines=1,
                           machine_rank=0, num_processes=2, rdzv_backend="static")
    watch = watch_start(args, run, {})
    assert watch is not None and watch.address == ("127.0.0.1", server.port) and watch.ranks == 2
    keys = job_store.launch_mark(server)
    server.add(keys.started, 2)
    watch.thread.join(10)
    assert not watch.thread.is_alive() and not watch.ended and server.get(keys.verdict) == b"started"
    assert watch_start(SimpleNamespace(**{**vars(args), "rdzv_backend": "c10d"}), run, {}) is None
    # standalone: accelerate chose its own port (29500 was taken): not the store the watch would read
    assert watch_start(SimpleNamespace(**{**vars(args), "standalone": True}), run, {}) is None
