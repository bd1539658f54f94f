"""The job's c10d store as the watchdog uses it: the TCPStore every rank of a torchrun job reaches (torchrun's agent
on the first node hosts it at ``MASTER_ADDR:MASTER_PORT`` from the rendezvous on; without torchrun, rank 0's process
group does), read by the launchers' start watch (``launch_watch``) and the ranks' watchdogs
(``llamafactory_hera.training.watchdog``).

Every key of a launch sits under a mark that the launch's first process draws (:func:`launch_mark`): a process of an
earlier launch (a node thawed into the next start) keeps its own mark, so it is never heard and never changes this
launch's keys. A restart of torchrun's workers (``--max-restarts``) keeps the agent's store and draws a mark of its
own (the restart count is in the mark's key).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

ROOT = "llamafactory_hera/watch"
START_ENV = "LLAMAFACTORY_HERA_START_TIMEOUT"  # a launch's start: every node joined, every rank heard
START_S = 600.0


def start_bound(env: Mapping[str, str] | None = None) -> float:
    """Seconds a launch's nodes have to join and its ranks to start their runs (:data:`START_ENV`)."""
    # os.environ read at the call: datasets' map(num_proc=N) rebinds it to a copy, which a default keeps
    env = os.environ if env is None else env
    with contextlib.suppress(ValueError):
        return float(env.get(START_ENV) or START_S)
    return START_S


@dataclass(frozen=True)
class Keys:
    """The keys of one launch (``prefix`` carries its mark)."""

    prefix: str

    def beat(self, rank: int) -> str:
        """Rank ``rank``'s heartbeat (its watchdog's JSON)."""
        return f"{self.prefix}beat/{rank}"

    def node(self, node: int) -> str:
        """Set by node ``node``'s launcher once it reached the store (its host's name)."""
        return f"{self.prefix}node/{node}"

    @property
    def started(self) -> str:
        """The count of ranks whose watchdog started."""
        return f"{self.prefix}started"

    @property
    def verdict(self) -> str:
        """The line a launcher ended the launch with (the first one set)."""
        return f"{self.prefix}verdict"

    def told(self, node: str) -> str:
        """Set once the line that ends the job is in node ``node``'s log."""
        return f"{self.prefix}told/{node}"


def address(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(MASTER_ADDR, MASTER_PORT)`` of this job, None when either is unset or not a port."""
    env = os.environ if env is None else env
    host = env.get("MASTER_ADDR", "")
    port = env.get("MASTER_PORT", "")
    return (host, int(port)) if host and port.isdigit() and int(port) > 0 else None


def client(host: str, port: int, timeout: float) -> Any:
    """A client of the store at ``host:port``, its operations bounded by ``timeout`` seconds where the store answers
    at all (a store whose host is frozen leaves a call waiting: the watchdog's guard bounds that). OSError when
    nothing listens there: tried with a plain socket first, as c10d logs each failed try with a C++ stack."""
    from torch.distributed import TCPStore  # lazy: the launcher reaches here before it needs torch

    with socket.create_connection((host, port), timeout=timeout):
        pass
    return TCPStore(host, port, None, False, timedelta(seconds=timeout), wait_for_workers=False)


def launch_mark(store: Any, restart: str = "0") -> Keys:
    """This launch's keys: the mark the first process to ask drew, the same for every later one."""
    mark = store.compare_set(f"{ROOT}/{restart}/mark", "", uuid.uuid4().hex).decode()
    return Keys(f"{ROOT}/{mark}/")
