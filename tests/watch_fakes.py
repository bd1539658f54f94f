"""A fake clock, a fake job store and a watchdog built on them, for unit tests of llamafactory_hera/training/watchdog.py
that call its pulse's parts one at a time: no thread, no wall time, no TCPStore."""

from __future__ import annotations

from typing import Any

from llamafactory_hera.runtime import job_store
from llamafactory_hera.training.watch_bounds import Place
from llamafactory_hera.training.watchdog import Watchdog


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """The c10d store calls the watchdog makes, on a dict; while ``fail`` holds an error, every call raises it."""

    host = "store-host"
    port = 29500

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail: BaseException | None = None
        self.calls = 0

    def _called(self) -> None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail

    def set(self, key: str, value: Any) -> None:
        self._called()
        self.data[key] = value if isinstance(value, bytes) else str(value).encode()

    def get(self, key: str) -> bytes:
        self._called()
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        self._called()
        return all(key in self.data for key in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._called()
        return [self.data[key] for key in keys]

    def compare_set(self, key: str, expected: str, desired: Any) -> bytes:
        self._called()
        if self.data.get(key, b"") == expected.encode():
            self.data[key] = desired if isinstance(desired, bytes) else str(desired).encode()
        return self.data[key]

    def add(self, key: str, amount: int) -> int:
        self._called()
        total = int(self.data.get(key, b"0")) + amount
        self.data[key] = str(total).encode()
        return total


def beat(watched: Watchdog, now: float) -> None:
    """One pulse of ``watched``'s thread at ``now``, as its loop runs it: its guard ticked, its beat, the pulse."""
    watched.clock.now = now
    watched.guarded = now
    watched._publish()
    watched._pulse()


def dog(store: FakeStore, clock: Clock, rank: int, world: int = 2, timeout: float | None = 10.0) -> Watchdog:
    """Rank ``rank`` of ``world`` ranks, one a node (node<rank>), whose :meth:`Watchdog.end` records its lines in
    ``ended`` instead of exiting; its threads never start."""
    place = Place(rank, world, 0, f"node{rank}", world, f"node{rank}", f"{store.host}:{store.port}")
    found = Watchdog(place, store, job_store.Keys("job/"), timeout, ".", clock=clock)
    found.ended = []
    found.end = lambda line, store=True: found.ended.append(line)
    found.threads = []
    return found
