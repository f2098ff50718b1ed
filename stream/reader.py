"""Reading a line's streams: the one place that knows where a reader stands and how it asks Redis.

Two ways to read, both returning :class:`~stream.entries.Entry` values:

- **following** (plain ``XREAD``, no consumer group, so the workers lose nothing): :class:`StreamCursor`
  holds the last id read per stream. A stream set to :data:`FROM_NOW` starts after its newest entry,
  resolved at the next read (later reads continue from the last id seen, so nothing added meanwhile is
  missed). :func:`follow` reads with a sync client, :func:`follow_async` with an asyncio one. Used by the
  results follower, the alert service's frame tail and the preview.
- **as a consumer group** (``XREADGROUP >``): :func:`read_group`. Used by the alert service.

On a Redis Cluster a read of several streams is split into one command per hash slot
(:func:`stream.keys.slot_groups`), and the wait ``block_ms`` is shared among them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stream.entries import Entry, entries_of, text
from stream.keys import slot_groups

FROM_NOW = "$"
FROM_START = "0-0"


def _per_command(block_ms: int | None, commands: int) -> int | None:
    """The wait of each of ``commands`` reads that together wait about ``block_ms`` (0 / None as given)."""
    return max(1, block_ms // commands) if block_ms else block_ms


class StreamCursor:
    """Where a follower of some streams stands: the last entry id read of each (see the module doc)."""

    def __init__(self, starts: Mapping[str, str], *, cluster: bool = False):
        self._ids = dict(starts)
        self._groups = slot_groups(list(self._ids), cluster)

    @classmethod
    def from_now(cls, streams: Iterable[str], *, cluster: bool = False) -> StreamCursor:
        return cls(dict.fromkeys(streams, FROM_NOW), cluster=cluster)

    @property
    def streams(self) -> list[str]:
        return list(self._ids)

    def rewind_to_now(self, *streams: str) -> None:
        """Start ``streams`` (all when none given) again after their newest entry, at the next read."""
        for stream in streams or self._ids:
            self._ids[stream] = FROM_NOW

    def unresolved(self) -> list[str]:
        return [s for s, i in self._ids.items() if i == FROM_NOW]

    def resolve(self, stream: str, newest: Sequence) -> None:
        """Set ``stream`` to its newest entry as XREVRANGE COUNT 1 answered (``0-0`` for an empty stream)."""
        self._ids[stream] = text(newest[0][0]) if newest else FROM_START

    def requests(self) -> list[dict[str, str]]:
        """The XREAD stream arguments, one dict per command (one per cluster slot)."""
        return [{s: self._ids[s] for s in group} for group in self._groups]

    def advance(self, reply: Iterable | None) -> list[Entry]:
        """The entries of an XREAD reply; the cursor moves past them."""
        entries = entries_of(reply)
        for entry in entries:
            self._ids[entry.stream] = entry.entry_id
        return entries


def mark_now(client: Any, cursor: StreamCursor) -> None:
    """Resolve the cursor's :data:`FROM_NOW` streams to their newest entry now (sync client): what is added
    after this call is all read. :func:`follow` does it itself; call it first to fix the start earlier."""
    for stream in cursor.unresolved():
        cursor.resolve(stream, client.xrevrange(stream, count=1))


def follow(client: Any, cursor: StreamCursor, *, count: int, block_ms: int | None) -> list[Entry]:
    """New entries of the cursor's streams (sync client), waiting up to about ``block_ms`` for some."""
    mark_now(client, cursor)
    requests = cursor.requests()
    block = _per_command(block_ms, len(requests))
    return cursor.advance([r for streams in requests for r in client.xread(streams, count=count, block=block) or ()])


async def follow_async(client: Any, cursor: StreamCursor, *, count: int, block_ms: int | None) -> list[Entry]:
    """:func:`follow` with an asyncio client."""
    for stream in cursor.unresolved():
        cursor.resolve(stream, await client.xrevrange(stream, count=1))
    requests = cursor.requests()
    block = _per_command(block_ms, len(requests))
    return cursor.advance([r for streams in requests
                           for r in await client.xread(streams, count=count, block=block) or ()])


def read_group(client: Any, group: str, consumer: str, stream_groups: Sequence[Sequence[str]], *, count: int,
               block_ms: int | None) -> list[Entry]:
    """New entries for ``consumer`` of ``group`` (``XREADGROUP >``), one command per list of
    ``stream_groups`` (cluster slots), waiting up to about ``block_ms`` in all."""
    block = _per_command(block_ms, len(stream_groups))
    return entries_of([r for streams in stream_groups
                       for r in client.xreadgroup(group, consumer, {s: ">" for s in streams}, count=count,
                                                  block=block) or ()])
