"""Exponential backoff, one policy for every retry loop (Redis reconnects, camera reconnects, alert sinks).

The caller does the waiting (``threading.Event.wait``, ``time.sleep``, ``asyncio.sleep`` or a retry-at time
for a loop that must not block), so threads, asyncio and the camera loop share the same delays.
"""

from __future__ import annotations


class Backoff:
    """Delays ``initial_s``, then doubled after each failure up to ``maximum_s``; :meth:`reset` after a success."""

    def __init__(self, initial_s: float, maximum_s: float):
        self.initial_s = float(initial_s)
        self.maximum_s = float(maximum_s)
        self.delay = self.initial_s  # the delay the next failure waits

    def next_delay(self) -> float:
        """The delay to wait now; the one after it doubles (at most ``maximum_s``)."""
        delay = self.delay
        self.delay = min(delay * 2, self.maximum_s)
        return delay

    def reset(self) -> None:
        self.delay = self.initial_s
