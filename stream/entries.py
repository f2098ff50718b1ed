"""What a stream entry of lineinspect holds, in one place: the payload field and the entry id.

Every entry of a line's frames and results streams carries its wire payload (:mod:`stream.wire`) in the
field ``p`` (:data:`PAYLOAD_FIELD`); it is written by the producer (:mod:`stream.producer`) and by the
worker's result script (:mod:`stream.queue`), and read here. Dead-letter entries are the exception: they keep
the payload under ``payload`` beside ``reason``, ``entry_id``, ``deliveries``, ``worker`` and ``ts``.

Replies of XREAD, XREADGROUP and XAUTOCLAIM are turned into :class:`Entry` values by :func:`entries_of` and
:func:`entry_of`; redis-py gives bytes or str depending on the client, :func:`text` takes either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PAYLOAD_FIELD = b"p"


def text(value: bytes | str) -> str:
    """A stream name, entry id or other reply value as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def payload_of(fields: Mapping[bytes, bytes] | None) -> bytes | None:
    """The wire payload of an entry's fields; None when the entry has none (a foreign or emptied entry)."""
    return (fields or {}).get(PAYLOAD_FIELD)


@dataclass(frozen=True)
class Entry:
    """One entry read from a stream. ``deleted``: the id is still pending in a group but its data was trimmed
    (XREADGROUP and XAUTOCLAIM report such an entry with no fields)."""

    stream: str
    entry_id: str
    payload: bytes | None = field(repr=False)
    deleted: bool = False


def entry_of(stream: str, entry_id: bytes | str, fields: Mapping[bytes, bytes] | None) -> Entry:
    return Entry(stream=stream, entry_id=text(entry_id), payload=payload_of(fields), deleted=not fields)


def entries_of(reply: Iterable | None) -> list[Entry]:
    """The entries of an XREAD / XREADGROUP reply (``[[stream, [[id, fields], ...]], ...]``), in order."""
    return [entry_of(text(stream), eid, fields) for stream, entries in reply or () for eid, fields in entries]
