"""A c10d store in memory that behaves as TCPStore does for the calls the plugin makes (``set``, ``get``, ``check``,
``multi_get``, ``multi_set``, ``add``, ``compare_set``, ``wait``) and counts every call by caller and kind: one
:meth:`CountingStore.client` per simulated rank or launcher. TCPStore's ``get``, ``multi_get`` and ``wait`` wait for a
missing key; here a ``get`` or ``multi_get`` of a missing key raises at once (a simulation on one thread would wait for
good) and is counted in :attr:`CountingStore.waited`; ``wait`` blocks until the keys exist (callers on threads)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class CountingStore:
    """The store's keys, and the calls made to them: ``calls[(caller, kind)]``."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls: Counter[tuple[Any, str]] = Counter()
        self.waited: list[tuple[Any, str]] = []  # (caller, key) of a get / multi_get that TCPStore would wait on
        self.changed = threading.Condition()

    def client(self, caller: Any) -> Client:
        """A connection whose calls are counted as ``caller``'s."""
        return Client(self, caller)

    def count(self, caller: Any = None, kinds: tuple[str, ...] = ()) -> int:
        """Calls made (by ``caller``, of ``kinds``; None / empty: all)."""
        return sum(n for (who, kind), n in self.calls.items() if caller in (None, who) and (not kinds or kind in kinds))

    def reset(self) -> None:
        self.calls.clear()


class Client:
    """One caller's connection to a :class:`CountingStore`."""

    def __init__(self, store: CountingStore, caller: Any) -> None:
        self.store = store
        self.caller = caller
        self.host = "127.0.0.1"
        self.port = 29500

    def _counted(self, kind: str) -> dict[str, bytes]:
        self.store.calls[(self.caller, kind)] += 1
        return self.store.data

    def _present(self, data: dict[str, bytes], key: str) -> bytes:
        if key not in data:
            self.store.waited.append((self.caller, key))
            raise RuntimeError(f"TCPStore would wait for {key}")
        return data[key]

    def set(self, key: str, value: Any) -> None:
        with self.store.changed:
            self._counted("set")[key] = _bytes(value)
            self.store.changed.notify_all()

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        with self.store.changed:
            data = self._counted("multi_set")
            for key, value in zip(keys, values, strict=True):
                data[key] = _bytes(value)
            self.store.changed.notify_all()

    def get(self, key: str) -> bytes:
        return self._present(self._counted("get"), key)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        data = self._counted("multi_get")
        return [self._present(data, key) for key in keys]

    def check(self, keys: list[str]) -> bool:
        data = self._counted("check")
        return all(key in data for key in keys)

    def add(self, key: str, amount: int) -> int:
        with self.store.changed:
            data = self._counted("add")
            total = int(data.get(key, b"0")) + amount
            data[key] = str(total).encode()
            self.store.changed.notify_all()
            return total

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        """TCPStore's: a missing key is set to ``desired`` only when ``expected`` is empty; a present one only when it
        holds ``expected``; the key's value after the call is returned (``expected`` for a missing key left unset)."""
        with self.store.changed:
            data = self._counted("compare_set")
            if key not in data:
                if _bytes(expected):
                    return _bytes(expected)
                data[key] = _bytes(desired)
            elif data[key] == _bytes(expected):
                data[key] = _bytes(desired)
            self.store.changed.notify_all()
            return data[key]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        seconds = timeout.total_seconds() if timeout is not None else 300.0
        with self.store.changed:
            data = self._counted("wait")
            if not self.store.changed.wait_for(lambda: all(key in data for key in keys), seconds):
                raise RuntimeError(f"Wait timeout for {[key for key in keys if key not in data][:3]}")
