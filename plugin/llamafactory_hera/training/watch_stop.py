"""The step every rank stops at on the save signal, agreed through the watchdog's beats, with no store call a step: a
rank that noted the signal says so in its beat; rank 0, which reads every beat, puts the step in its own; every rank
reads it there, says in its own beat that it heard it, and ``training/checkpoints.py`` stops at it.

The rank that noted it waits at its step's end until rank 0 has read that every rank heard the step: no rank passes
the step after, so every rank stops at the agreed one however late its pulse thread reads (a stop step one rank
misses hangs the others in the save's collectives). Meanwhile rank 0 and the noting rank read a tenth of a pulse apart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

WAIT_PULSES = 12  # the noting rank's longest wait for every rank to hear the stop step


class StopStep:
    """One rank's side of the agreement."""

    def __init__(self, wake: threading.Event, pulse_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.wake = wake  # the pulse thread's: the signal is said at once
        self.pulse_s = pulse_s
        self.sleep = sleep
        self.signalled: int | None = None  # the step at whose end this rank noted the save signal
        self.step: int | None = None  # the step every rank stops at: rank 0's, read from its beat
        self.everyone = False  # every rank heard the step: rank 0 read it in their beats, the others in rank 0's

    def noted(self, step: int, noted: bool) -> int | None:
        """At step ``step``'s end (``noted``: this rank noted the save signal): the step every rank stops at, once rank
        0's beat carried it. The first time this rank noted it, it waits until every rank heard the step (at most
        :data:`WAIT_PULSES` pulses: a watchdog whose beats stopped ends the job meanwhile)."""
        if noted and self.signalled is None:
            self.signalled = step
            self.wake.set()
            waited = 0.0
            while not self.everyone and waited < WAIT_PULSES * self.pulse_s:
                self.sleep(self.pulse_s / 10)
                waited += self.pulse_s / 10
        return self.step

    def pending(self, monitor: bool) -> bool:
        """Whether this rank, rank 0 (``monitor``) or the one that noted the signal, waits on a stop not yet agreed: it
        reads a tenth of a pulse apart. The other ranks read at their pace: hearing the step once is their part."""
        waiting = self.signalled is not None or (monitor and self.step is not None)
        return waiting and not self.everyone

    def agree(self, step: int, signalled: Iterable[int]) -> None:
        """Rank 0's, on its pulse thread alone: rank 0 is in step ``step``; ranks noted the signal at the end of steps
        ``signalled``."""
        if self.step is None:
            self.step = max([step, *(noted + 1 for noted in signalled)])

    def count(self, beats: Iterable[dict[str, Any]]) -> None:
        """Rank 0's, after reading every rank's last ``beats``: whether each one still in the run heard the step."""
        if self.step is not None:
            self.everyone = all(beat.get("heard") == self.step or beat.get("left") for beat in beats)

    def fields(self, monitor: bool) -> dict[str, Any]:
        """What this rank's beat says (``monitor``: rank 0's)."""
        found: dict[str, Any] = {} if self.signalled is None else {"signal": self.signalled}
        if self.step is not None:
            found["heard"] = self.step
        if monitor and self.step is not None:
            found["stop"] = self.step
            found["everyone"] = self.everyone
        return found

    def heard(self, beat: dict[str, Any]) -> None:
        """Rank 0's ``beat``, read."""
        if beat.get("stop") is not None:
            self.step = int(beat["stop"])
            self.everyone = bool(beat.get("everyone"))


def signalled(raws: Iterable[bytes]) -> list[int]:
    """The steps at whose end ranks noted the signal, from their beats (only those that say it are parsed)."""
    found = [json.loads(raw).get("signal") for raw in raws if b'"signal"' in raw]
    return [int(step) for step in found if step is not None]
