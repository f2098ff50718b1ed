"""Results a worker holds while Redis is out of memory (``maxmemory`` reached, policy ``noeviction``).

Redis full refuses every write that allocates (the publish script's ``SET``/``XADD``), but not ``XDEL``,
``XACK`` or ``XREADGROUP``. So a worker whose publish is refused for OOM:

1. deletes the frame entry's data (``XDEL`` without ``XACK``: :meth:`stream.queue.FrameQueue.release`), which
   frees the frame's bytes while the entry stays pending under this consumer;
2. keeps the encoded result here and goes on with the next entries (each one frees its frame the same way);
3. before every read, publishes the held results again (:meth:`HeldResults.flush`); the publish script is
   idempotent and acknowledges the entry, so a held result is published exactly once.

When more than ``limit`` results are held the worker stops reading and only retries. If the worker dies while
holding results, the entries' data is gone but the ids stay pending: the next reclaim reports them as deleted
and counts them (``lineinspect_worker_frames_trimmed_total``): lost, but counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class HeldResult:
    entry_id: str
    frame_id: str
    payload: bytes
    on_published: Callable[[bool], None]  # called with complete()'s answer (True published, False duplicate)


class HeldResults:
    def __init__(self, queue, limit: int = 64):
        self.queue = queue
        self.limit = limit
        self.items: list[HeldResult] = []

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.limit

    def hold(self, item: HeldResult, *, release: bool = True) -> None:
        """Keep ``item``; with ``release`` (out of memory) free its frame's memory (the entry stays pending).

        Without ``release``: Redis was unreachable while publishing. The result is kept until Redis answers
        again, so that a restart that lost the stream does not lose a frame a worker had already inspected
        (its result then reaches the new server; the group no longer knows the entry: an orphan result).
        """
        import redis

        if release:
            try:
                self.queue.release(item.entry_id)
            except redis.RedisError as exc:  # not freed now; the entry is still pending and the result held
                log.warning("entry %s: XDEL while out of memory failed: %s", item.entry_id, exc)
        self.items.append(item)

    def flush(self) -> int:
        """Publish held results in order until Redis refuses again (OOM); returns how many were published.

        Connection errors are raised to the caller (the results stay held)."""
        import redis

        done = 0
        while self.items:
            item = self.items[0]
            try:
                published = self.queue.complete(item.entry_id, item.frame_id, item.payload)
            except redis.OutOfMemoryError:
                break
            self.items.pop(0)
            item.on_published(bool(published))
            done += 1
        return done
