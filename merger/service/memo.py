"""A bounded, time-limited memo: what the service remembers between a form's requests (the Hub username
of a token, a config's check, a picked model's details), never for long and never much of it."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar

Value = TypeVar("Value")


def digest(*parts: str) -> tuple[str, ...]:
    """A memo key of `parts` (a config, a token, a model id): their sha256s, so no key holds a token.

    Lone surrogates (text pasted from a broken source) are hashed as they are, not refused here.
    """
    return tuple(hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest() for part in parts)


class Memo(Generic[Value]):
    """At most `size` values, each kept `ttl_s` seconds; the least recently stored goes first. Thread-safe.

    Args:
        ttl_s: how long a value is reused, in seconds (the Hub may change meanwhile).
        size: how many values are kept at most.
    """

    def __init__(self, ttl_s: float, size: int):
        self._ttl_s = ttl_s
        self._size = size
        self._values: OrderedDict[tuple[str, ...], tuple[Value, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> Value | None:
        """The value stored under `key`, or None when there is none or it expired."""
        with self._lock:
            hit = self._values.get(key)
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def put(self, key: tuple[str, ...], value: Value) -> Value:
        """Store `value` under `key` (dropping the oldest past `size`); returns `value`."""
        with self._lock:
            self._values[key] = (value, time.monotonic() + self._ttl_s)
            self._values.move_to_end(key)
            while len(self._values) > self._size:
                self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget everything (tests; a changed environment)."""
        with self._lock:
            self._values.clear()
