"""The step every rank stops at on the save signal, agreed through the watchdog's beats, with no store call a step: a
rank that noted the signal says so in its beat; rank 0, which reads every beat, puts the step in its own; every rank
reads it there, and ``training/checkpoints.py`` stops at it.

The rank that noted it waits at its step's end until it heard the step, then a pulse more, in which every rank reads
rank 0's beat. Meanwhile no rank passes the step after (a collective a step needs the waiting rank): the stop step can
be the one rank 0 is in, at least the one after the noting rank's, as when the ranks agreed through a store call a
step."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


class StopStep:
    """One rank's side of the agreement."""

    def __init__(self, wake: threading.Event, pulse_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.wake = wake  # the pulse thread's: the signal is said at once
        self.pulse_s = pulse_s
        self.sleep = sleep
        self.signalled: int | None = None  # the step at whose end this rank noted the save signal
        self.step: int | None = None  # the step every rank stops at: rank 0's, read from its beat

    def noted(self, step: int, noted: bool) -> int | None:
        """At step ``step``'s end (``noted``: this rank noted the save signal): the step every rank stops at, once rank
        0's beat carried it. The first time this rank noted it, it waits for it: at most two pulses (rank 0's read of
        this beat, this rank's read of rank 0's), then a pulse for every other rank's read; under a bound of at least 4
        pulses no rank is named meanwhile."""
        if noted and self.signalled is None:
            self.signalled = step
            self.wake.set()
            waited = 0.0
            while self.step is None and waited < 2 * self.pulse_s:
                self.sleep(self.pulse_s / 10)
                waited += self.pulse_s / 10
            if self.step is not None:
                self.sleep(self.pulse_s)
        return self.step

    def agree(self, step: int, signalled: Iterable[int]) -> None:
        """Rank 0's, on its pulse thread alone: rank 0 is in step ``step``; ranks noted the signal at the end of steps
        ``signalled``."""
        if self.step is None:
            self.step = max([step, *(noted + 1 for noted in signalled)])

    def fields(self, monitor: bool) -> dict[str, int]:
        """What this rank's beat says (``monitor``: rank 0's)."""
        found = {} if self.signalled is None else {"signal": self.signalled}
        if monitor and self.step is not None:
            found["stop"] = self.step
        return found

    def heard(self, beat: dict[str, Any]) -> None:
        """Rank 0's ``beat``, read."""
        if beat.get("stop") is not None:
            self.step = int(beat["stop"])


def signalled(raws: Iterable[bytes]) -> list[int]:
    """The steps at whose end ranks noted the signal, from their beats (only those that say it are parsed)."""
    found = [json.loads(raw).get("signal") for raw in raws if b'"signal"' in raw]
    return [int(step) for step in found if step is not None]
