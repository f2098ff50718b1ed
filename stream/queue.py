"""The worker side of a line's frame queue (a Redis stream with a consumer group). No torch here.

Entry layout: :mod:`stream.entries` (the payload field of frames and results, the dead-letter fields).

Delivery guarantees:
- at-least-once processing: an entry is acknowledged only after its result was published; entries of a
  dead consumer are reclaimed (``XAUTOCLAIM``) by a living one once idle for ``queue.claim_idle_ms``;
- exactly one result per frame id: :meth:`FrameQueue.complete` publishes through one Lua script that sets
  an idempotency key ``done:<frame id>`` (``SET NX EX``) and only publishes when it was not set before;
- poison entries (undecodable, or delivered more than ``queue.max_deliveries`` times) go to the dead-letter
  stream, atomically with their acknowledgement (:meth:`FrameQueue.dead_letter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from config.settings import QueueSettings
from stream.entries import PAYLOAD_FIELD, entries_of, entry_of, text
from stream.keys import LineKeys

# KEYS: done key, results stream, frames stream
# ARGV: ttl, results maxlen, payload, channel, group, entry id, done value, PUBLISH or SPUBLISH (cluster: the
# line's shard channel, in the line's slot), payload field
_COMPLETE_LUA = """
local published = 0
if redis.call('SET', KEYS[1], ARGV[7], 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[2]), '*', ARGV[9], ARGV[3])
  redis.call(ARGV[8], ARGV[4], ARGV[3])
  published = 1
end
local acked = redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[3], ARGV[6])
return {published, acked}
"""

# KEYS: dead-letter stream, frames stream
# ARGV: maxlen, payload, reason, entry id, deliveries, worker, ts, group
_DEAD_LETTER_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[1]), '*',
  'payload', ARGV[2], 'reason', ARGV[3], 'entry_id', ARGV[4], 'deliveries', ARGV[5],
  'worker', ARGV[6], 'ts', ARGV[7])
redis.call('XACK', KEYS[2], ARGV[8], ARGV[4])
redis.call('XDEL', KEYS[2], ARGV[4])
return id
"""


# KEYS: frames stream, heartbeat hash
# ARGV: group, idle ms, this consumer, now (unix s), heartbeat age limit (s)
_PRUNE_LUA = """
local removed = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
  if type(consumers) == 'table' and not consumers.err then
    for _, c in ipairs(consumers) do
      local m = {}
      for i = 1, #c, 2 do m[c[i]] = c[i + 1] end
      if m['name'] ~= ARGV[3] and tonumber(m['pending']) == 0 and tonumber(m['idle']) > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], m['name'])
        table.insert(removed, m['name'])
      end
    end
  end
end
local stale = {}
local hb = redis.call('HGETALL', KEYS[2])
for i = 1, #hb, 2 do
  local ts = tonumber(hb[i + 1])
  if hb[i] ~= ARGV[3] and (ts == nil or ts < tonumber(ARGV[4]) - tonumber(ARGV[5])) then
    redis.call('HDEL', KEYS[2], hb[i])
    table.insert(stale, hb[i])
  end
end
return {removed, stale}
"""


@dataclass(frozen=True)
class QueueEntry:
    """One entry of the frames stream as delivered to this consumer."""

    entry_id: str
    payload: bytes | None  # None when the entry has no ``p`` field
    deliveries: int = 1  # how often Redis has delivered it (1 for a fresh entry)


@dataclass(frozen=True)
class ClaimResult:
    entries: tuple[QueueEntry, ...]  # taken over from idle consumers, with their delivery counts
    deleted_ids: tuple[str, ...]  # were pending but trimmed from the stream before anyone finished them


@dataclass(frozen=True)
class QueueStats:
    length: int  # entries in the stream
    lag: int  # entries not yet delivered to the group (-1 when Redis cannot say)
    pending: int  # delivered, not acknowledged


def group_exists(client, stream: str, group: str) -> bool:
    import redis

    try:
        return any(text(g.get("name", "")) == group for g in client.xinfo_groups(stream))
    except redis.ResponseError:  # no such key
        return False


def ensure_group(client, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) at id 0 if missing. Ingest calls it too, before its first
    frame, so the group exists before Redis can fill up.

    Redis full (maxmemory + noeviction) refuses XGROUP CREATE with OOM: fine when the group exists (a worker
    must start then: draining the stream is what frees memory); raised otherwise.
    """
    import redis

    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.OutOfMemoryError:
        if not group_exists(client, stream, group):
            raise
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class FrameQueue:
    """Consumer ``consumer`` of the line's worker group. Construct, then call :meth:`ensure_group`."""

    def __init__(self, client, keys: LineKeys, queue: QueueSettings, consumer: str):
        self.client = client
        self.keys = keys
        self.settings = queue
        self.group = queue.group
        self.consumer = consumer
        self._claim_cursor = "0-0"
        # results published for entries the group no longer had pending (Redis lost the stream, or the entry
        # was trimmed and a reclaim already counted it): counted elsewhere as lost, yet answered
        self.orphaned = 0
        self._complete = None
        self._dead_letter = None
        self._prune = None
        from stream.redisclient import is_cluster

        self._publish = "SPUBLISH" if is_cluster(client) else "PUBLISH"

    def _scripts(self) -> None:
        if self._complete is None:
            self._complete = self.client.register_script(_COMPLETE_LUA)
            self._dead_letter = self.client.register_script(_DEAD_LETTER_LUA)

    # ------------------------------------------------------------------------------------ group
    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; a group that exists is kept as it is.

        The group starts at ``0``: frames queued before the first worker came are processed too.
        """
        ensure_group(self.client, self.keys.frames, self.group)

    def check_access(self) -> None:
        """Load the Lua scripts the worker needs, so a Redis user without ``@scripting`` (or another permission
        the worker needs) is refused at start-up with a clear message, not on the first frame.

        Raises :class:`~stream.contracts.QueueAccessError`.
        """
        import redis

        from stream.contracts import QueueAccessError

        self._scripts()
        try:
            for script in (self._complete, self._dead_letter):
                script.sha = self.client.script_load(script.script)
            self.client.xinfo_groups(self.keys.frames)
        except redis.exceptions.NoPermissionError as exc:
            raise QueueAccessError(
                f"the Redis user lacks a permission the worker needs ({exc}); grant it +@stream +@scripting "
                f"+set +publish +spublish +hset +hdel +ping on keys '{self.keys.base}:*'") from None

    # ------------------------------------------------------------------------------------ reading
    def read(self, count: int | None = None, block_ms: int | None = None) -> list[QueueEntry]:
        """New entries for this consumer (``XREADGROUP >``), waiting up to ``block_ms`` (0 = do not wait)."""
        import redis

        count = count or self.settings.batch
        block = self.settings.block_ms if block_ms is None else block_ms
        try:
            reply = self.client.xreadgroup(self.group, self.consumer, {self.keys.frames: ">"}, count=count,
                                           block=block if block > 0 else None)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # stream deleted under us: recreate and go on
                self.ensure_group()
                return []
            raise
        return [QueueEntry(entry_id=e.entry_id, payload=e.payload, deliveries=1) for e in entries_of(reply)]

    def reclaim(self, count: int | None = None) -> ClaimResult:
        """Take over entries idle longer than ``queue.claim_idle_ms`` (``XAUTOCLAIM``), ``count`` at most.

        Scans on from where the last call stopped. Ids that Redis reports as deleted (trimmed while pending)
        are acknowledged here and returned in ``deleted_ids`` so the caller can count them.
        """
        import redis

        count = count or self.settings.batch
        try:
            reply = self.client.xautoclaim(self.keys.frames, self.group, self.consumer,
                                           min_idle_time=self.settings.claim_idle_ms,
                                           start_id=self._claim_cursor, count=count)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # stream gone (deleted, or Redis restarted empty): recreate
                self.ensure_group()
                self._claim_cursor = "0-0"
                return ClaimResult(entries=(), deleted_ids=())
            raise
        cursor, claimed = reply[0], reply[1]
        deleted = [text(i) for i in (reply[2] if len(reply) > 2 else ())]
        self._claim_cursor = text(cursor)
        if deleted:
            self.client.xack(self.keys.frames, self.group, *deleted)
        entries = []
        for entry_id, fields in claimed:
            entry = entry_of(self.keys.frames, entry_id, fields)
            if entry.deleted:  # redis < 7 reports trimmed entries this way
                deleted.append(entry.entry_id)
                self.client.xack(self.keys.frames, self.group, entry.entry_id)
                continue
            entries.append(QueueEntry(entry_id=entry.entry_id, payload=entry.payload,
                                      deliveries=self.deliveries(entry.entry_id)))
        return ClaimResult(entries=tuple(entries), deleted_ids=tuple(deleted))

    def deliveries(self, entry_id: str) -> int:
        """How often the entry has been delivered (0 when it is not pending)."""
        rows = self.client.xpending_range(self.keys.frames, self.group, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 0

    # ------------------------------------------------------------------------------------ finishing
    def complete(self, entry_id: str, frame_id: str, result_payload: bytes) -> bool:
        """Publish the result of ``frame_id`` once, then ack and delete the entry, atomically.

        Returns True when the result was published, False when a result for this frame id exists already
        (a reclaimed frame finished twice): nothing is published then, the entry is still acknowledged.
        """
        self._scripts()
        q = self.settings
        reply = self._complete(
            keys=[self.keys.done(frame_id), self.keys.results, self.keys.frames],
            args=[q.done_ttl_s, q.results_maxlen, result_payload, self.keys.results_channel, self.group,
                  entry_id, f"{self.consumer}:{entry_id}", self._publish, PAYLOAD_FIELD])
        published, acked = (int(x) for x in reply)
        if published and not acked:
            self.orphaned += 1
        return bool(published)

    def dead_letter(self, entry_id: str, payload: bytes | None, reason: str, deliveries: int,
                    worker_id: str) -> str:
        """Move an entry to the dead-letter stream with its reason; acked and deleted in the same script.

        Returns the dead-letter entry id.
        """
        self._scripts()
        dl_id = self._dead_letter(
            keys=[self.keys.dead_letter, self.keys.frames],
            args=[self.settings.dead_letter_maxlen, payload if payload is not None else b"", reason, entry_id,
                  int(deliveries), worker_id, f"{time.time():.3f}", self.group])
        return text(dl_id)

    def note_failure(self, entry_id: str, reason: str) -> None:
        """Remember why a pending entry failed (a job timeout, a detector error), so that the worker which
        finally dead-letters it after ``max_deliveries`` can name the real reason. Kept ``done_ttl_s``."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.failures, entry_id, reason)
        pipe.expire(self.keys.failures, self.settings.done_ttl_s)
        pipe.execute()

    def last_failure(self, entry_id: str) -> str:
        """The failure noted for ``entry_id`` ("" when none); the note is removed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.keys.failures, entry_id)
        pipe.hdel(self.keys.failures, entry_id)
        value, _ = pipe.execute()
        return text(value) if value is not None else ""

    def prune(self, idle_s: float | None = None, now: float | None = None) -> tuple[list[str], list[str]]:
        """Remove dead consumers and stale heartbeats, atomically (one script); returns their names.

        A consumer other than this one that is idle longer than ``idle_s`` (``queue.dead_consumer_idle_s``)
        and has nothing pending is deleted (``XGROUP DELCONSUMER``: safe, it holds no entry); a consumer with
        pending entries is left to ``XAUTOCLAIM`` first. Heartbeats older than ``idle_s`` are deleted.
        """
        idle_s = self.settings.dead_consumer_idle_s if idle_s is None else idle_s
        if self._prune is None:
            self._prune = self.client.register_script(_PRUNE_LUA)
        removed, stale = self._prune(
            keys=[self.keys.frames, self.keys.heartbeat],
            args=[self.group, int(idle_s * 1000), self.consumer, f"{time.time() if now is None else now:.3f}",
                  idle_s])
        return [text(n) for n in removed], [text(n) for n in stale]

    def release(self, entry_id: str) -> None:
        """Delete an entry's data but keep it pending (XDEL without XACK): frees its memory when Redis is out
        of memory while the worker holds the entry's result. If this worker dies before publishing, a
        reclaim reports the id as deleted and it is counted (``lineinspect_worker_frames_trimmed_total``)."""
        self.client.xdel(self.keys.frames, entry_id)

    # ------------------------------------------------------------------------------------ stats
    def stats(self) -> QueueStats:
        """Stream length, group lag and pending count (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.keys.frames)
        pipe.xinfo_groups(self.keys.frames)
        try:
            length, groups = pipe.execute()
        except Exception as exc:
            import redis

            if isinstance(exc, redis.ResponseError) and "no such key" in str(exc).lower():
                return QueueStats(length=0, lag=0, pending=0)
            raise
        for g in groups:
            if text(g.get("name", "")) == self.group:
                lag = g.get("lag")
                return QueueStats(length=int(length), lag=int(lag) if lag is not None else -1,
                                  pending=int(g.get("pending", 0)))
        return QueueStats(length=int(length), lag=int(length), pending=0)

    def heartbeat(self, worker_id: str, now: float | None = None) -> None:
        self.client.hset(self.keys.heartbeat, worker_id, f"{time.time() if now is None else now:.3f}")

    def remove_heartbeat(self, worker_id: str) -> None:
        self.client.hdel(self.keys.heartbeat, worker_id)
