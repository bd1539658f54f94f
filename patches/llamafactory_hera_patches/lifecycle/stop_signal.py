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
_noted: dict[str, Any] = {"name": None, "received": False, "steps": False, "depth": 0}


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


def stop_before_step(kept: str) -> None:
    """After a kept batch of a pass before step 1: when the signal came, one line (rank 0) and :class:`Stopped`."""
    if _noted["received"] and not _noted["steps"]:
        if os.environ.get("RANK", "0") == "0":
            print(f"[llamafactory-hera] {_noted['name']}: stopped before step 1, {kept}; to go on, {RERUN}: it starts "
                  "the run, reusing what was kept.", flush=True)
        raise Stopped(0)


def _default_in_child() -> None:
    if _noted["name"] and signal.getsignal(getattr(signal, _noted["name"])) is _note:  # SIGTERM: Pool.terminate()
        signal.signal(getattr(signal, _noted["name"]), signal.SIG_DFL)
        _noted.update(name=None, received=False, depth=0)


if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_default_in_child)
