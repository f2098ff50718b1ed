"""A bounded, thread-safe cache by key: the newest entries kept, the oldest dropped first.

The readers that follow a line's streams keep what they read for a while (decoded frames for overlays and
alert snapshots, results waiting for their frame in the preview); each bounds it by a count of entries, by a
byte budget, or both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """At most ``max_items`` values and at most ``max_bytes`` of ``size_of(value)`` (None = no such bound);
    the newest value is always kept, even when it alone is larger than ``max_bytes``."""

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None,
                 size_of: Callable[[V], int] = lambda _v: 0):
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._values: OrderedDict[str, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, value: V) -> None:
        with self._lock:
            old = self._values.pop(key, None)
            if old is not None:
                self._bytes -= self._size_of(old)
            self._values[key] = value
            self._bytes += self._size_of(value)
            while len(self._values) > 1 and self._over():
                _, dropped = self._values.popitem(last=False)
                self._bytes -= self._size_of(dropped)

    def _over(self) -> bool:
        return ((self.max_items is not None and len(self._values) > self.max_items)
                or (self.max_bytes is not None and self._bytes > self.max_bytes))

    def get(self, key: str) -> V | None:
        with self._lock:
            return self._values.get(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    @property
    def bytes(self) -> int:
        return self._bytes
