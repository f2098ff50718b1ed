"""Redis key layout, in one place. Every process derives names from here.

Two layouts (``redis.key_layout``):

- ``plain`` (default; the keys of earlier versions): ``<prefix>:<line>:frames``, ``<prefix>:<line>:results``...
- ``line_tag``: ``<prefix>:{<line>}:frames``... The ``{line}`` hash tag puts every key of a line in one Redis
  Cluster slot, so each Lua script (enqueue, complete, dead-letter, prune) and each MULTI of the memory store
  touches one slot, while different lines spread over the masters. Needed for ``redis.cluster``.

The lines index ``<prefix>:lines`` is one key outside every line's slot: with ``line_tag`` ingest adds its
line to it with its own ``SADD`` instead of inside the enqueue script.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LAYOUTS = ("plain", "line_tag")


@dataclass(frozen=True)
class LineKeys:
    prefix: str
    line: str
    layout: str = "plain"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"key layout {self.layout!r}: one of {', '.join(LAYOUTS)}")

    @property
    def base(self) -> str:
        """``<prefix>:<line>`` or ``<prefix>:{<line>}``: every key of the line starts with it."""
        return f"{self.prefix}:{{{self.line}}}" if self.layout == "line_tag" else f"{self.prefix}:{self.line}"

    def _k(self, *parts: str) -> str:
        return ":".join((self.base, *parts))

    @property
    def frames(self) -> str:  # stream of encoded frames (consumer group of workers)
        return self._k("frames")

    @property
    def results(self) -> str:  # stream of encoded results
        return self._k("results")

    @property
    def results_channel(self) -> str:  # pub/sub channel, same payload as the results stream
        return self._k("results", "live")

    @property
    def dead_letter(self) -> str:  # stream: fields payload, reason, entry_id, deliveries, worker
        return self._k("deadletter")

    @property
    def alerts(self) -> str:  # stream of alerts (JSON)
        return self._k("alerts")

    def done(self, frame_id: str) -> str:  # idempotency key: one result per frame id
        return self._k("done", frame_id)

    def memory(self, part: str) -> str:  # normal memory of the line (see workers.memory.store)
        return self._k("memory", part)

    @property
    def failures(self) -> str:  # hash: entry id -> the last failure of a pending entry (job_timeout, inspect)
        return self._k("failures")

    @property
    def identity(self) -> str:  # token made when the stream was first written (a restart that lost it: new token)
        return self._k("identity")

    @property
    def heartbeat(self) -> str:  # hash: worker id -> last heartbeat unix time
        return self._k("workers")

    def review(self, part: str) -> str:  # operator review: kept frames and results (see stream.review.archive)
        return self._k("review", part)

    @property
    def reviews(self) -> str:  # stream of review requests (consumer group of workers; stream.review.requests)
        return self._k("reviews")

    @property
    def audit(self) -> str:  # stream: who reviewed what, when, and what came of it
        return self._k("audit")


def line_keys(prefix: str, line: str, layout: str = "plain") -> LineKeys:
    return LineKeys(prefix=prefix, line=line, layout=layout)


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16 of its hash tag, as CLUSTER KEYSLOT computes it)."""
    from redis.crc import key_slot as _slot

    return _slot(key.encode() if isinstance(key, str) else key)


def slot_groups(keys: Iterable[str], cluster: bool) -> list[list[str]]:
    """``keys`` split into groups a single multi-key command (XREAD, XREADGROUP) may name: one group on a
    single node, one per cluster slot on a cluster (a command naming keys of two slots fails there)."""
    keys = list(keys)
    if not cluster:
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for k in keys:
        groups.setdefault(key_slot(k), []).append(k)
    return list(groups.values())


def lines_index(prefix: str) -> str:
    """Set of line ids seen by ingest processes (the preview lists them)."""
    return f"{prefix}:lines"
