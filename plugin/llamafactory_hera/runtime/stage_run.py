"""A plugin stage's run as the stage patch and the method's run class hand it over (``recipe/run.py``): LLaMA-Factory's
parsed arguments (:class:`HostArguments`) and the run-wide controls the method's keys set (:class:`RunControls`), read
once from its arguments by its run class, then handed on by name. Imports nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class HostArguments(NamedTuple):
    """LLaMA-Factory's parsed arguments, in the order its ``get_train_args`` returns them."""

    model: Any
    data: Any
    training: Any
    finetuning: Any
    generating: Any


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
