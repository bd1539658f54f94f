"""The job's c10d TCPStore (torchrun's agent hosts it at ``MASTER_ADDR:MASTER_PORT``, else rank 0's process group), read
by the launchers' start watch and the ranks' watchdogs.

A launch's keys sit under a mark its first process draws (:func:`launch_mark`): a process of an earlier launch (a node
thawed into the next start) keeps its own mark, so it never changes this launch's keys. A worker restart
(``--max-restarts``) keeps the store and draws a new mark.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from . import env_knobs

ROOT = "llamafactory_hera/watch"
START_ENV = env_knobs.START_TIMEOUT  # bound: every node joined, every rank heard
STARTED = "started"  # the verdict of a launch whose nodes joined and ranks started
CONNECT_S = 30.0  # the longest a store client waits to connect


def start_bound(env: Mapping[str, str] | None = None) -> float:
    """Seconds a launch's nodes have to join and its ranks to start (:data:`START_ENV`)."""
    return env_knobs.seconds(START_ENV, env)


@dataclass(frozen=True)
class Keys:
    """The keys of one launch (``prefix`` carries its mark)."""

    prefix: str

    def beat(self, rank: int) -> str:
        """Rank ``rank``'s heartbeat (JSON)."""
        return f"{self.prefix}beat/{rank}"

    def node(self, node: int) -> str:
        """Set by node ``node``'s launcher once it reached the store (its host name)."""
        return f"{self.prefix}node/{node}"

    @property
    def joined(self) -> str:
        """How many nodes' launchers reached the store."""
        return f"{self.prefix}joined"

    @property
    def started(self) -> str:
        """How many ranks' watchdogs started."""
        return f"{self.prefix}started"

    @property
    def verdict(self) -> str:
        """The line a launcher ended the launch with (the first set), or :data:`STARTED`."""
        return f"{self.prefix}verdict"

    def told(self, node: str) -> str:
        """Set once the line ending the job is in node ``node``'s log."""
        return f"{self.prefix}told/{node}"


def address(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(MASTER_ADDR, MASTER_PORT)``; None when either is unset or not a port."""
    env = os.environ if env is None else env
    host = env.get("MASTER_ADDR", "")
    port = env.get("MASTER_PORT", "")
    return (host, int(port)) if host and port.isdigit() and int(port) > 0 else None


def client(host: str, port: int, timeout: float) -> Any:
    """A store client, calls bounded by ``timeout`` where the store answers (a frozen host leaves a call waiting: the
    watchdog's guard bounds it). OSError when nothing listens, tried by plain socket first: c10d logs each failed try
    with a C++ stack."""
    from torch.distributed import TCPStore  # lazy: the launcher reaches here before it needs torch

    # connecting waits longer than a call: every rank of a job connects at once as it starts, on loaded hosts, and a
    # pulse's bound (0.5 s for a short recipe bound) once ended a healthy rank there
    connect = max(timeout, CONNECT_S)
    with socket.create_connection((host, port), timeout=connect):
        pass
    store = TCPStore(host, port, None, False, timedelta(seconds=connect), wait_for_workers=False)
    store.set_timeout(timedelta(seconds=timeout))
    return store


def launch_mark(store: Any, restart: str = "0") -> Keys:
    """This launch's keys: the mark the first process drew, the same for every later one."""
    mark = store.compare_set(f"{ROOT}/{restart}/mark", "", uuid.uuid4().hex).decode()
    return Keys(f"{ROOT}/{mark}/")


def wait_told(store: Any, keys: Keys, node: str, says: bool, monitor: bool, nodes: int, seconds: float) -> None:
    """Mark the job's last line said on ``node`` (by its sayer, ``says``), then wait up to ``seconds``: the monitor for
    every node's mark, the others for their node's."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        if says:
            store.set(keys.told(node), "1")
            told = store.add(keys.told("count"), 1)
            while monitor and told < nodes and time.monotonic() < deadline:
                time.sleep(0.1)
                told = store.add(keys.told("count"), 0)
        else:
            while not store.check([keys.told(node)]) and time.monotonic() < deadline:
                time.sleep(0.1)
