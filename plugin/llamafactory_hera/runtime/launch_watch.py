"""A torchrun launch watched from ``llamafactory-cli``'s start until every rank's watchdog runs: an unresolvable
``MASTER_ADDR`` is one line at once; a node that never joins (or ``NNODES`` above the nodes started) or ranks stuck
before their run give one line within ``LLAMAFACTORY_HERA_START_TIMEOUT`` (600 s), naming what is missing, in every
node's log that reaches the job's store.

Node 0's launcher sets the verdict in the job's store: the launch started, or, once the bound passed, the line naming
what is missing. The others read it, say a line and end their torchrun; one whose node 0 set none :data:`FOLLOW_S`
after the bound judges for itself. An elastic launch (``RDZV_ID``) has its store elsewhere: unwatched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from llamafactory_hera.runtime import agent_notes, job_store, log
from llamafactory_hera.runtime.errors import RecipeError

POLL_S = 1.0  # store reads; name-lookup retries
NOTE_S = 0.1  # looks for a refusal noted between store reads: the job's store goes within a second of it
RESOLVE_S = 30.0
KILL_AFTER_S = 40.0  # torchrun's agent ends its ranks within 30 s of SIGTERM
FOLLOW_S = 10.0  # past its bound, a node other than 0 waits this long for node 0's verdict, then judges itself


def check_master_address(env: Mapping[str, str] | None = None, retry_s: float = RESOLVE_S) -> None:
    """RecipeError naming ``MASTER_ADDR`` when it does not resolve here (a temporary failure retried for ``retry_s``):
    c10d would retry for minutes, only warning."""
    # not a default: datasets' map(num_proc=N) rebinds os.environ
    env = os.environ if env is None else env
    host = env.get("MASTER_ADDR") or "127.0.0.1"
    deadline = time.monotonic() + retry_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as error:
            if error.errno != socket.EAI_AGAIN or time.monotonic() > deadline:
                raise RecipeError(
                    f"MASTER_ADDR={host} does not resolve on this node ({socket.gethostname()}): {error.strerror}. "
                    "Set MASTER_ADDR to the first node's host name or address as every node resolves it "
                    "(recipes/slurm/node.sh: the first of `scontrol show hostnames`), then run the same command again."
                ) from None
            time.sleep(POLL_S)


class StartWatch:
    """One node's watch of its launch's start."""

    def __init__(
        self,
        address: tuple[str, int],
        node: int,
        nodes: int,
        bound: float,
        end: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.node = node
        self.nodes = nodes
        self.bound = bound
        self.end = end
        self.clock = clock
        self.started = clock()
        self.ranks = 0
        self.expected = threading.Event()
        self.ended = False
        self.store: Any = None
        self.keys: job_store.Keys | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llamafactory-hera-start-watch", daemon=True)

    def expect(self, ranks: int) -> None:
        """``ranks`` watchdogs are to start (0: the watch ends once every node joined)."""
        self.ranks = ranks
        self.expected.set()

    def _run(self) -> None:
        while not self._waited(0.0):
            overdue = self._overdue()
            missing = self.missing(overdue)
            if missing is None:
                return
            if overdue:
                said = self._said(missing)
                if said != job_store.STARTED:  # node 0 saw the start meanwhile
                    self.ended = True
                    self.end(said)
                return
            self._waited(POLL_S)

    def _waited(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True once the watch is done: stopped, or a rank of this node noted a refusal (a
        store call once the store is gone prints c10d's C++ stack)."""
        deadline = time.monotonic() + seconds
        while not (self.done.is_set() or agent_notes.refused()):
            if time.monotonic() >= deadline:
                return False
            self.done.wait(NOTE_S)
        self.done.set()
        return True

    def _overdue(self) -> bool:
        """Whether this launcher says the line now: node 0's past the bound; another's once node 0's has said none
        :data:`FOLLOW_S` later (its launcher gone or stuck), or at the bound when it reaches no store."""
        late = self.clock() - self.started - self.bound
        return late > (0.0 if self.node == 0 or self.keys is None else FOLLOW_S)

    def missing(self, overdue: bool = False) -> str | None:
        """What the launch still lacks, in words (``overdue``: to be said, naming the nodes absent); None: nothing, the
        watch is done."""
        where = f"{self.address[0]}:{self.address[1]}"
        if self.keys is None and not self._connect():
            return (
                f"node {self.node} ({socket.gethostname()}) could not reach the job's store at {where}: node 0's "
                "launcher has not started, or MASTER_ADDR / MASTER_PORT point elsewhere, or a firewall is between"
            )
        try:
            if self.node != 0 and self.store.check([self.keys.verdict]):
                return self._heard(self.store.get(self.keys.verdict).decode())
            if self.node != 0 and not overdue:
                return "node 0's launcher has not said whether the launch started"
            joined = int(self.store.add(self.keys.joined, 0))
            started = int(self.store.add(self.keys.started, 0)) if joined >= self.nodes else 0
            absent = self._absent() if overdue and joined < self.nodes else []  # a call a node: once, when said
        except (RuntimeError, ValueError, OSError):
            return f"the job's store at {where} stopped answering"
        if joined < self.nodes:
            return (
                f"{joined} of NNODES={self.nodes} nodes joined the job at {where}: node(s) "
                f"{', '.join(str(node) for node in absent)} did not (never started, or stuck before its launcher "
                "reached the store: see that node's log)"
            )
        if not self.expected.is_set() or started < self.ranks:
            return (
                f"every node joined, but {started} of {self.ranks or '?'} ranks started their run (the others are "
                "stuck before it: LLaMA-Factory's start, the recipe's checks, the process group's rendezvous)"
            )
        return self._heard(self._said_once(job_store.STARTED))

    def _absent(self) -> list[int]:
        return [node for node in range(self.nodes) if not self.store.check([self.keys.node(node)])]

    def _heard(self, verdict: str) -> None:
        """The watch ends on node 0's verdict: the launch started, or the line this launcher says too."""
        self.done.set()
        if verdict != job_store.STARTED:
            self.ended = True
            self.end(verdict)

    def _connect(self) -> bool:
        try:
            self.store = job_store.client(*self.address, POLL_S * 5)
            self.keys = job_store.launch_mark(self.store)
            self.store.set(self.keys.node(self.node), socket.gethostname())
            self.store.add(self.keys.joined, 1)
            return True
        except (RuntimeError, ValueError, OSError):
            self.store = self.keys = None
            return False

    def _said(self, missing: str) -> str:
        """The line for every node: the first launcher's, set in the store for the others."""
        line = (
            f"watchdog: the launch did not start within {self.bound:.0f} s ({job_store.START_ENV}): {missing}. The "
            "job ends (exit 1) instead of waiting on the rendezvous; fix what is missing and run the same command "
            "again."
        )
        return self._said_once(line)

    def _said_once(self, verdict: str) -> str:
        """``verdict`` set for every node, unless one was set first (that one)."""
        if self.store is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                return self.store.compare_set(self.keys.verdict, "", verdict).decode()
        return verdict

    def stop(self) -> None:
        self.done.set()


def end_launch(message: str) -> None:
    """Say ``message`` and end this launcher: SIGTERM to its torchrun, which ends its ranks (SIGKILL after
    :data:`KILL_AFTER_S`); with no child yet, exit at once."""
    print(f"\n{log.line(message)}", file=sys.stderr, flush=True)
    children = _children()
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if not children:
        os._exit(1)

    def kill() -> None:
        time.sleep(KILL_AFTER_S)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=kill, daemon=True).start()


def _children() -> list[int]:
    """This process's children (Linux: /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{task}/children", encoding="ascii") as handle:
                found += [int(pid) for pid in handle.read().split()]
    return found


@contextlib.contextmanager
def watching(free_port: Callable[[], int], nodes: int | None, node: int | None) -> Iterator[StartWatch | None]:
    """This node's launch watched for the block (torchrun, static rendezvous; an unset ``MASTER_PORT`` drawn by
    ``free_port`` for the block, as LLaMA-Factory would). None: elastic (``RDZV_ID``) or ``NNODES=1:2``."""
    drawn = "MASTER_PORT" not in os.environ
    if drawn:
        os.environ["MASTER_PORT"] = str(free_port())
    address = job_store.address({"MASTER_ADDR": "127.0.0.1", **os.environ})  # LLaMA-Factory's default address
    found = None
    if address is not None and not os.environ.get("RDZV_ID") and nodes and node is not None:
        found = StartWatch(address, node, nodes, job_store.start_bound(os.environ), end_launch)
        found.thread.start()
    try:
        yield found
    finally:
        if found is not None:
            found.stop()
        if drawn:
            os.environ.pop("MASTER_PORT", None)
