"""A plugin stage's run as the stage patch and the method's run class hand it over: LLaMA-Factory's parsed arguments and
the run-wide controls the method's keys set, read once by its run class. Imports nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class HostArguments(NamedTuple):
    """LLaMA-Factory's parsed arguments, in ``get_train_args``' order."""

    model: Any
    data: Any
    training: Any
    finetuning: Any
    generating: Any


@dataclass(frozen=True)
class RunControls:
    """What a whole run obeys beside the method's maths (docs/multinode.md): the save signal (noted by the stage patch,
    :mod:`.stop_signal`; left to the ranks by the launcher) and the watchdog.
    """

    save_signal: str | None = None  # sigterm, sigusr1, sigusr2 or none; None: the method saves no checkpoint
    save_signal_key: str | None = None  # its recipe key, for the lines
    watched: bool = False  # a method whose runs take several ranks
    watchdog_timeout: float | None = None  # seconds; None: per section; 0: no watchdog (the ranks still end together)
