"""The run-wide controls of a method's run, as its recipe sets them (:class:`RunControls`): read once from its
arguments by its run class, then handed on by name. Imports nothing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunControls:
    """What a whole run obeys beside the method's maths (docs/multinode.md: preemption and the watchdog).

    The stage patch notes ``save_signal`` from the stage's start (:mod:`.stop_signal`), the launcher leaves it to the
    ranks (:mod:`.launch_signals`), and the method's trainer saves a whole checkpoint on it; the run's ranks are
    watched with ``watchdog_timeout`` (``training/watchdog.py``) where ``watched``.
    """

    save_signal: str | None = None  # sigterm, sigusr1, sigusr2 or none; None: the method saves no checkpoint
    save_signal_key: str | None = None  # the recipe key that names it, for the lines that name it
    watched: bool = False  # whether the run's ranks are watched: a method whose runs take several ranks
    watchdog_timeout: float | None = None  # seconds; None: per section; 0: no watchdog (the ranks still end together)
