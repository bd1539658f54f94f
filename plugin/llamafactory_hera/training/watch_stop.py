"""The step every rank stops at on the save signal, agreed through the watchdog's beats, with no store call a step: a
rank that noted the signal says so in its beat; rank 0, which reads every beat, puts the step in its own; every rank
reads it there, and ``training/checkpoints.py`` stops at it."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any


class StopStep:
    """One rank's side of the agreement."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake  # the pulse thread's: the signal is said at once
        self.signalled: int | None = None  # the step at whose end this rank noted the save signal
        self.step: int | None = None  # the step every rank stops at: rank 0's, read from its beat
        self.pace = 0  # the most steps this rank took in one pulse
        self.paced = 0  # its step at the last pulse

    def noted(self, step: int, noted: bool) -> int | None:
        """At step ``step``'s end (``noted``: this rank noted the save signal): the step every rank stops at, once rank
        0's beat carried it."""
        if noted and self.signalled is None:
            self.signalled = step
            self.wake.set()
        return self.step

    def pulse(self, step: int) -> None:
        """At each pulse, the rank's step then."""
        if self.paced:  # from the first step on (a resumed run's first is far from 0)
            self.pace = max(self.pace, step - self.paced)
        self.paced = step

    def agree(self, step: int) -> None:
        """Rank 0's, on its pulse thread alone, once a rank noted the signal (rank 0 at ``step``). Every rank hears the
        stop step within two pulses (rank 0's write, then each one's read), in which none passes it: rank 0's most
        steps in one pulse, twice, and one for a rank a step ahead (a collective a step)."""
        if self.step is None:
            self.step = step + 2 + 2 * self.pace

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


def signalled(raws: Iterable[bytes]) -> bool:
    """Whether a beat says its rank noted the signal (found in the bytes: no beat parsed again)."""
    return any(b'"signal"' in raw for raw in raws)
