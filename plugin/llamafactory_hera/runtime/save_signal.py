"""A plugin stage's save signal (``<prefix>_save_on_signal``), noted from the stage's start: before step 1 a pass
stops after a batch it kept; in the steps, ``training/checkpoints.py`` saves a whole checkpoint. The other warning
signal is taken for it: its default would end every process unsaved. Launcher side: :mod:`.launch_signals`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from llamafactory_hera.runtime.log import first_on_node, line, say_on_each_node

RERUN = "run the same command again"  # every stop line's advice
WARNINGS = ("SIGUSR1", "SIGUSR2")  # a scheduler's warnings (SLURM's --signal=USR1@N); the host uses neither


@dataclass
class _Noted:
    name: str | None = None  # the save signal (``SIGTERM`` ...); None outside a noting block
    received: bool = False
    steps: bool = False  # in the steps: stopping is training/checkpoints.py's
    depth: int = 0  # noting blocks open
    deferred: bool = False  # in a distributed pass: its ranks stop together after it
    key: str | None = None  # the recipe key that set it, for the other warning signal's line
    came: str | None = None  # the signal that came (the save signal, or a warning signal taken for it)
    told: bool = False  # the other warning signal's line was said


_noted = _Noted()


class Stopped(SystemExit):
    """Stopped on the save signal before step 1, what the passes computed kept (exit code 0)."""


def received() -> bool:
    return _noted.received


def noted_name() -> str | None:
    """The save signal noted now (``SIGTERM`` ...); None where none is."""
    return _noted.name


def came() -> str | None:
    """The signal that came; None before."""
    return _noted.came


def _note(signum: int, frame: Any) -> None:
    _noted.received = True
    _noted.came = _noted.came or signal.Signals(signum).name


def _note_other(signum: int, frame: Any) -> None:
    """A warning signal that is not the save signal: taken for it, said once a node."""
    name = signal.Signals(signum).name
    _noted.received = True
    _noted.came = _noted.came or name
    if _noted.told or not first_on_node():
        return
    _noted.told = True
    key = _noted.key or "the recipe's save signal"
    wanted = _noted.name
    text = line(
        f"{name} came, but {key} is {wanted.lower()}: the job's signal and the recipe's differ. "
        f"Taken for {wanted}: the run saves and stops. Make them one: {key}: {name.lower()}, or the job's "
        f"--signal={wanted[3:]}@N."
    )
    try:
        print(text, flush=True)
    except RuntimeError:  # reentrant call inside a write to stdout: bypass it
        os.write(1, f"\n{text}\n".encode())


def signal_number(name: str | None) -> int | None:
    """The signal a save-signal value names (``sigterm`` ...); None for ``none`` or None."""
    number = getattr(signal, str(name).upper(), None) if name else None
    return number if isinstance(number, int) else None


def others(name: str) -> list[int]:
    return [getattr(signal, other) for other in WARNINGS if other != name and hasattr(signal, other)]


@contextlib.contextmanager
def noting(name: str | None, steps: bool = False, key: str | None = None) -> Iterator[None]:
    """Note ``name`` for the block (main thread only), taking the other warning signals for it."""
    signum = signal_number(name)
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    own = signal.Signals(signum).name
    handlers = {signum: _note, **dict.fromkeys(others(own), _note_other)}
    if own == "SIGTERM" and not steps:
        # torchrun's agent ends its ranks with SIGTERM: until a pass keeps something (:func:`keeping`) its default ends
        # the rank at once, where a handler waits for the main thread to leave a C call (a process group's start
        # waiting for a dead peer: torchrun's 30 s, then SIGKILL)
        handlers[signum] = signal.SIG_DFL
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    before = replace(_noted)
    _noted.name = own
    _noted.steps = steps or _noted.steps
    _noted.depth += 1
    _noted.key = key or _noted.key
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if before.depth == 0:  # the outermost block: what it noted goes with it
            vars(_noted).update(vars(before))
        else:
            _noted.steps = before.steps
            _noted.depth = before.depth


@contextlib.contextmanager
def keeping() -> Iterator[None]:
    """A pass before step 1 that keeps what it computed: SIGTERM, which :func:`noting` leaves to its default before the
    steps, noted in it."""
    term = _noted.name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is not _note
    if not term or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def steps_over() -> None:
    """After the last step, with no stop taken: SIGTERM gets its default back, so one from here ends the rank at once;
    one noted in the last steps, too late for a stop, goes on to the final save it asked for."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (_note, _note_other):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """No stop in the block: one rank stopping alone would leave the others in a distributed pass's gather."""
    before = _noted.deferred
    _noted.deferred = True
    try:
        yield
    finally:
        _noted.deferred = before


def stop_before_step(kept: str, agreed: bool | None = None) -> None:
    """After a kept batch of a pass before step 1: if the signal came (``agreed``: decided together), one line and
    :class:`Stopped`."""
    noted = _noted.received and not _noted.deferred if agreed is None else agreed
    if noted and not _noted.steps:
        say_on_each_node(
            f"{_noted.came or _noted.name}: stopped before step 1, {kept}; to go on, {RERUN}: it starts the "
            "run, reusing what was kept."
        )
        raise Stopped(0)


def _default_in_child() -> None:
    """A forked worker leaves the save signal to its rank: SIGTERM before the steps gets its default back
    (``Pool.terminate()`` uses it); else ignored, as are the other warning signals."""
    name = _noted.name
    if not name:
        return
    if signal.getsignal(getattr(signal, name)) is _note:
        default = name == "SIGTERM" and not _noted.steps
        signal.signal(getattr(signal, name), signal.SIG_DFL if default else signal.SIG_IGN)
    for other in others(name):
        if signal.getsignal(other) is _note_other:
            signal.signal(other, signal.SIG_IGN)
    _noted.name = None
    _noted.received = False
    _noted.depth = 0
    _noted.came = None


if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_default_in_child)
