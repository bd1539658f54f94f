"""A :class:`~llamafactory_hera.runtime.errors.RecipeError` ends a training process with its one line (other errors
keep Python's report); a refusal on any rank ends every rank within seconds, printed once per node (:func:`install`).

A torchrun job's ranks share a flag in the c10d store of torchrun's agent: each rank watches it and exits 1 once a
refusing rank set it. With no store, each rank prints its own report.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

from llamafactory_hera.runtime import agent_notes, elastic, env_knobs
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import PREFIX, line

TRACEBACK_ENV = env_knobs.TRACEBACK
RANK_WAIT_S = 30.0  # a rank > 0 waits this long for torchrun to stop it before printing its refusal
REFUSED = "refused"
POLL_S = 0.2  # how often a rank looks at the flag
CONNECT_S = 2.0  # one try to reach the store
TELL_S = 30.0  # a refusing rank tries this long to reach the store
NODES_S = 5.0  # the first refuser waits this long for the other nodes to take the line


def raised_by_plugin(error: BaseException) -> bool:
    return isinstance(error, RecipeError)


def short_report(error: BaseException) -> str:
    return (
        line(f"(raised by the plugin's checks; {TRACEBACK_ENV}=1 prints the full traceback)")
        + "\n"
        + line(f"error: {error}")
        + "\n"
    )


def say(report: str, env: Mapping[str, str] | None = None) -> None:
    """Leave ``report`` to this node's launcher, which prints it last; print it where no launcher takes it."""
    if not agent_notes.note_refusal(report, env):
        print(report, end="", file=sys.stderr, flush=True)


def waits_for_rank_0(environ: Mapping[str, str]) -> bool:
    """Whether this is a rank > 0 of a torchrun job (whose agent stops every rank when one fails)."""
    return bool(environ.get("TORCHELASTIC_RUN_ID")) and environ.get("RANK", "0").strip() not in {"", "0"}


@dataclass(frozen=True)
class Job:
    host: str
    port: int
    world_size: int
    rank: int
    prefix: str  # the keys of this launch (torchrun's restarts start afresh)
    node: str  # torchrun's node rank (GROUP_RANK), else the host's name
    local_rank: int
    nodes: int


def job_of(env: Mapping[str, str] | None = None) -> Job | None:
    """This process's torchrun job, or None without torchrun's agent (only the agent's store outlives every rank)."""
    # os.environ read at the call: datasets' map(num_proc=N) rebinds it to a copy, which a default keeps
    env = os.environ if env is None else env
    try:
        world, rank, local_rank, port, local_world = (
            int(env.get(key) or 0) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE")
        )
    except ValueError:
        return None
    if world < 2 or not env.get("MASTER_ADDR") or not port or not env.get("TORCHELASTIC_RUN_ID"):
        return None
    return Job(
        env["MASTER_ADDR"],
        port,
        world,
        rank,
        f"llamafactory_hera/{elastic.start_key(env)}/",
        env.get("GROUP_RANK") or socket.gethostname(),
        local_rank,
        max(1, world // (local_world or world)),
    )


def several_nodes(env: Mapping[str, str] | None = None) -> str | None:
    """What shows this process runs on one of several nodes, else None."""
    env = os.environ if env is None else env
    with contextlib.suppress(ValueError):  # an elastic range (1:2) or no number: the launcher decides
        if int(env.get("NNODES") or 1) > 1:
            return f"NNODES={env['NNODES']}"
        world = int(env.get("WORLD_SIZE") or 1)
        if world > int(env.get("LOCAL_WORLD_SIZE") or world):
            return f"WORLD_SIZE={world} over LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}"
    return None


def tell_torchrun(environ: Mapping[str, str] | None = None) -> None:
    """Write the error file torchrun's agent reads, so its report points at the refusal's line."""
    environ = os.environ if environ is None else environ
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    note = f"refused by llamafactory-hera's checks: see the {PREFIX} error line above"
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as file:
        # as torch's @record writes it (a bare string makes the agent warn twice)
        json.dump({"message": {"message": note, "extraInfo": {"timestamp": str(int(time.time()))}}}, file)


def _listening(job: Job) -> bool:
    """Whether the store's port takes connections (a plain socket: c10d logs each failed try)."""
    try:
        with socket.create_connection((job.host, job.port), timeout=CONNECT_S):
            return True
    except OSError:
        return False


def _store(job: Job) -> Any | None:
    if not _listening(job):
        return None
    # lazy: only in a job's rank, which loads torch anyway
    from torch.distributed import TCPStore

    try:
        return TCPStore(job.host, job.port, None, False, timedelta(seconds=CONNECT_S), wait_for_workers=False)
    except (RuntimeError, ValueError, OSError):
        return None


_refusing = threading.Event()  # this rank refused: its own flag must not end it before it prints


def _node_report(store: Any, job: Job) -> str | None:
    """The report if this rank prints it for its node, else None."""
    if job.local_rank != 0:
        return None
    try:
        refused = json.loads(store.get(job.prefix + REFUSED))
        if isinstance(refused, dict) and refused.get("node") != job.node:
            store.add(job.prefix + "told", 1)
            return refused.get("report")
    except (RuntimeError, ValueError):
        pass
    return None


def _watch(job: Job) -> None:
    store = None
    while store is None and not _refusing.is_set():
        store = _store(job)
        if store is None:
            time.sleep(POLL_S)
    while store is not None and not _refusing.is_set():
        try:
            refused = store.check([job.prefix + REFUSED])
        except RuntimeError:
            return  # the store's host has ended: the job is ending
        if refused and not _refusing.is_set():
            report = _node_report(store, job)
            if report:
                say(report)
            tell_torchrun()
            os._exit(1)  # another rank refused the recipe and said so
        time.sleep(POLL_S)


_watching: list[threading.Thread] = []


def _stop_watching() -> None:
    """End the watch before the interpreter (a thread in a store call at exit aborts the process)."""
    _refusing.set()
    for thread in _watching:
        thread.join(timeout=CONNECT_S + 2 * POLL_S)


atexit.register(_stop_watching)


def watch(env: Mapping[str, str] | None = None) -> None:
    """In a job's rank, end this process when another rank refuses (idempotent)."""
    env = os.environ if env is None else env
    job = job_of(env)
    if job is None or _watching:
        return
    thread = threading.Thread(target=_watch, args=(job,), name="llamafactory-hera refusal", daemon=True)
    _watching.append(thread)
    thread.start()


def announce(report: str, env: Mapping[str, str] | None = None) -> tuple[bool, bool]:
    """Tell the other ranks this one refused: (whether this rank still prints ``report``, whether the store was
    reached)."""
    env = os.environ if env is None else env
    _refusing.set()
    job = job_of(env)
    store = None
    deadline = time.monotonic() + TELL_S
    while job is not None and store is None and time.monotonic() < deadline:
        store = _store(job)
        if store is None:
            time.sleep(POLL_S)
    if store is None:  # not a job (job None), or no store reached
        return True, False
    printed = False
    try:
        if store.add(job.prefix + "refusals", 1) == 1:
            printed = True  # before the flag: the others end at once, then torchrun stops this rank
            say(report, env)
            store.set(job.prefix + REFUSED, json.dumps({"node": job.node, "report": report}))
            deadline = time.monotonic() + NODES_S
            while store.add(job.prefix + "told", 0) < job.nodes - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)  # until each other node has its line: this rank's end ends torchrun's store
            return False, True
        return _node_report(store, job) is not None, True
    except RuntimeError:
        return not printed, False


def install() -> None:
    """Route uncaught plugin errors to :func:`short_report` (idempotent; off with LLAMAFACTORY_HERA_TRACEBACK=1)."""
    previous = sys.excepthook
    if getattr(previous, "__module__", None) == __name__:
        return
    # a value neither on nor off: short reports, the first of them its own line (env_knobs.check, before the recipe)
    with contextlib.suppress(RecipeError):
        if env_knobs.switch(TRACEBACK_ENV):
            return

    def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if not raised_by_plugin(error):
            previous(kind, error, tb)
            return
        report = short_report(error)
        prints, shared = announce(report, os.environ)
        tell_torchrun(os.environ)
        if not shared and waits_for_rank_0(os.environ):
            time.sleep(RANK_WAIT_S)  # no store reached: torchrun's agent stops this rank once rank 0 has failed
        if prints:  # else this rank or another of its node said it
            say(report)
        _stop_watching()

    sys.excepthook = excepthook
