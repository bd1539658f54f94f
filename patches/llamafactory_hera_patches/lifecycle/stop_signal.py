"""A plugin stage's save signal (``<prefix>_save_on_signal``) noted from the stage's start (the stage patch, before the
parse): through the load and the passes before step 1, each of which stops after a batch it kept
(:func:`stop_before_step`: one line, exit 0), and the steps, where ``training/checkpoints.py`` saves a whole checkpoint.
A forked child (a data worker) gets the signal's default back. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

RERUN = "run the same command again"  # what every stop line tells: the same command continues the run
_noted: dict[str, Any] = {"name": None, "received": False, "steps": False, "depth": 0, "deferred": False}


class Stopped(SystemExit):
    """The run stopped on its save signal before step 1, what its passes computed kept (exit code 0)."""


def received() -> bool:
    return bool(_noted["received"])


def _note(signum: int, frame: Any) -> None:
    _noted["received"] = True


@contextlib.contextmanager
def noting(name: str | None, steps: bool = False) -> Iterator[None]:
    """The signal ``name`` (``sigterm`` ...; None or ``none``: nothing) noted for the block in the main thread; in
    the steps' block (``steps``) stopping is ``training/checkpoints.py``'s."""
    signum = getattr(signal, str(name).upper(), None) if name else None
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, before = signal.signal(signum, _note), dict(_noted)
    _noted.update(name=signal.Signals(signum).name, steps=steps or _noted["steps"], depth=_noted["depth"] + 1)
    try:
        yield
    finally:
        signal.signal(signum, previous)
        _noted.update(before if before["depth"] == 0 else {"steps": before["steps"], "depth": before["depth"]})


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """No stop inside the block: the ranks of a distributed pass stop together after it (``agreed``), since a rank
    that stopped alone would leave the others waiting in the pass's gather."""
    before, _noted["deferred"] = _noted["deferred"], True
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
                f"[llamafactory-hera] {_noted['name']}: stopped before step 1, {kept}; to go on, {RERUN}: it starts "
                "the run, reusing what was kept.",
                flush=True,
            )
        raise Stopped(0)


def _default_in_child() -> None:
    """A forked child (a data worker, a preprocessing pool's worker) leaves the save signal to its rank: a scheduler
    signals every process of the job, and a worker it killed would end the rank before its save. SIGTERM before the
    steps gets its default back (``Pool.terminate()`` ends a pool's workers with it); otherwise ignored."""
    name = _noted["name"]
    if name and signal.getsignal(getattr(signal, name)) is _note:
        default = name == "SIGTERM" and not _noted["steps"]
        signal.signal(getattr(signal, name), signal.SIG_DFL if default else signal.SIG_IGN)
        _noted.update(name=None, received=False, depth=0)


if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_default_in_child)
