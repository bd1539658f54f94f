"""The step every rank stops at on the save signal, agreed through the watchdog's beats, with no store call a step: a
rank that noted the signal says so in its beat; rank 0, which reads every beat, puts the step in its own; every rank
reads it there, and ``training/checkpoints.py`` stops at it."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Any


class StopStep:
    """One rank's side of the agreement."""

    def __init__(self, wake: threading.Event, pulse_s: float) -> None:
        self.wake = wake  # the pulse thread's: the signal is said at once
        self.pulse_s = pulse_s
        self.signalled: int | None = None  # the step at whose end this rank noted the save signal
        self.step: int | None = None  # the step every rank stops at: rank 0's, read from its beat
        self.pace = 0  # the most steps this rank began in one pulse
        self.paced = 0  # its step at the last pulse
        self.fastest = math.inf  # the shortest step's seconds seen at a pulse

    def noted(self, step: int, noted: bool) -> int | None:
        """At step ``step``'s end (``noted``: this rank noted the save signal): the step every rank stops at, once rank
        0's beat carried it."""
        if noted and self.signalled is None:
            self.signalled = step
            self.wake.set()
        return self.step

    def pulse(self, step: int, step_s: float | None) -> None:
        """At each pulse, the rank's step then and the last step's seconds."""
        if self.paced:  # from the first step on (a resumed run's first is far from 0)
            self.pace = max(self.pace, step - self.paced)
        self.paced = step
        self.fastest = min(self.fastest, step_s or math.inf)

    def agree(self, step: int, elapsed: float, step_s: float | None) -> None:
        """Rank 0's, on its pulse thread alone, once a rank noted the signal: rank 0 is ``elapsed`` seconds into step
        ``step``, the last took ``step_s``. Every rank hears the stop step within two pulses (rank 0's write, then each
        one's read): the first step to end after that at the fastest pace seen. No rank is a step ahead of rank 0
        before rank 0's step nears its end (a collective a step): then the next one is the earliest."""
        if self.step is not None:
            return
        # n steps begun in one pulse: n - 1 of them within it, the shortest at most a pulse / (n - 1)
        fastest = min(self.fastest, step_s or math.inf, self.pulse_s / (self.pace - 1) if self.pace > 1 else math.inf)
        if math.isinf(fastest) or fastest <= 0:  # no step timed yet
            self.step = step + 2
            return
        left = max(0.0, fastest - elapsed)  # of this step, at most
        self.step = step + math.ceil(max(0.0, 2 * self.pulse_s - left) / fastest)

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
