"""A plugin stage's save signal (``<prefix>_save_on_signal``) noted from the stage's start (the stage patch, before the
parse): through the load and the passes before step 1, each of which stops after a batch it kept
(:func:`stop_before_step`: one line, exit 0), and the steps, where ``training/checkpoints.py`` saves a whole checkpoint.
A scheduler's other warning signal (SIGUSR1 or SIGUSR2: the job's ``--signal`` and the recipe's key disagree) is
said in one line and taken for the save signal, where its default would end every process of the job unsaved. A
forked child (a data worker) gets the signal's default back.

The launching process (``llamafactory-cli`` before torchrun, ``accelerate launch``: :func:`leave_to_ranks`) leaves
the signals to the ranks, and ``llamafactory-cli`` outlives a SIGTERM while its torchrun runs (:func:`launching`: a
scheduler ends a job step whose task ended) and exits 0 when the ranks stopped on the signal (:func:`ended`).
Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

RERUN = "run the same command again"  # what every stop line tells: the same command continues the run
WARNINGS = ("SIGUSR1", "SIGUSR2")  # a scheduler's warning signals (SLURM's --signal=USR1@N); the host uses neither
_noted: dict[str, Any] = {
    "name": None,
    "received": False,
    "steps": False,
    "depth": 0,
    "deferred": False,
    "key": None,
    "came": None,
    "told": False,
}


class Stopped(SystemExit):
    """The run stopped on its save signal before step 1, what its passes computed kept (exit code 0)."""


def received() -> bool:
    return bool(_noted["received"])


def noted_name() -> str | None:
    """The save signal noted now (``SIGTERM`` ...: the stage's ``<prefix>_save_on_signal``, from its start), None where
    none is (``none``, or outside a plugin stage)."""
    return _noted["name"]


def came() -> str | None:
    """The signal that came (``SIGUSR1`` ...): the save signal, or a warning signal taken for it; None before."""
    return _noted["came"]


def _note(signum: int, frame: Any) -> None:
    _noted.update(received=True, came=_noted["came"] or signal.Signals(signum).name)


def _note_other(signum: int, frame: Any) -> None:
    """A warning signal that is not the save signal: taken for it, said once (local rank 0 of each node: every node's
    log)."""
    name = signal.Signals(signum).name
    _noted.update(received=True, came=_noted["came"] or name)
    if _noted["told"] or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _noted["told"] = True
    key = _noted["key"] or "the recipe's save signal"
    wanted = _noted["name"]
    line = (
        f"[llamafactory-hera] {name} came, but {key} is {wanted.lower()}: the job's signal and the recipe's differ. "
        f"Taken for {wanted}: the run saves and stops. Make them one: {key}: {name.lower()}, or the job's "
        f"--signal={wanted[3:]}@N."
    )
    try:
        print(line, flush=True)
    except RuntimeError:  # the handler ran inside a write to stdout (a reentrant call): past the stream
        os.write(1, f"\n{line}\n".encode())


def signal_number(name: str | None) -> int | None:
    """The signal a save-signal key's value names (``sigterm`` ...), None for ``none`` or None."""
    number = getattr(signal, str(name).upper(), None) if name else None
    return number if isinstance(number, int) else None


def others(name: str) -> list[int]:
    """The warning signals a save signal ``name`` (``SIGTERM`` ...) leaves over."""
    return [getattr(signal, other) for other in WARNINGS if other != name and hasattr(signal, other)]


@contextlib.contextmanager
def noting(name: str | None, steps: bool = False, key: str | None = None) -> Iterator[None]:
    """The signal ``name`` (``sigterm`` ...; None or ``none``: nothing) noted for the block in the main thread, and the
    other warning signals taken for it (``key``: the recipe key that names it, for their line); in the steps' block
    (``steps``) stopping is ``training/checkpoints.py``'s."""
    signum = signal_number(name)
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    own = signal.Signals(signum).name
    handlers = {signum: _note, **dict.fromkeys(others(own), _note_other)}
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    before = dict(_noted)
    _noted.update(name=own, steps=steps or _noted["steps"], depth=_noted["depth"] + 1, key=key or _noted["key"])
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _noted.update(before if before["depth"] == 0 else {"steps": before["steps"], "depth": before["depth"]})


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """No stop inside the block: the ranks of a distributed pass stop together after it (``agreed``), since a rank
    that stopped alone would leave the others waiting in the pass's gather."""
    before = _noted["deferred"]
    _noted["deferred"] = True
    try:
        yield
    finally:
        _noted["deferred"] = before


def stop_before_step(kept: str, agreed: bool | None = None) -> None:
    """After a kept batch of a pass before step 1: when the signal came (``agreed``: when any rank noted it, decided
    together), one line (rank 0) and :class:`Stopped`."""
    noted = _noted["received"] and not _noted["deferred"] if agreed is None else agreed
    if noted and not _noted["steps"]:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"[llamafactory-hera] {_noted['came'] or _noted['name']}: stopped before step 1, {kept}; to go on, "
                f"{RERUN}: it starts the run, reusing what was kept.",
                flush=True,
            )
        raise Stopped(0)


def _default_in_child() -> None:
    """A forked child (a data worker, a preprocessing pool's worker) leaves the save signal to its rank: a scheduler
    signals every process of the job, and a worker it killed would end the rank before its save. SIGTERM before the
    steps gets its default back (``Pool.terminate()`` ends a pool's workers with it); otherwise ignored, as are the
    other warning signals (their line is the rank's)."""
    name = _noted["name"]
    if name and signal.getsignal(getattr(signal, name)) is _note:
        default = name == "SIGTERM" and not _noted["steps"]
        signal.signal(getattr(signal, name), signal.SIG_DFL if default else signal.SIG_IGN)
        for other in others(name):
            if signal.getsignal(other) is _note_other:
                signal.signal(other, signal.SIG_IGN)
        _noted.update(name=None, received=False, depth=0, came=None)


if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_default_in_child)
