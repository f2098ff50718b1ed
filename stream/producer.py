"""The producer of a line's frames stream: every frame entry is written here (payload field:
:mod:`stream.entries`).

:class:`FrameProducer` is ingest's one round trip per frame: add it to the line's stream, trim, and account
for what was lost. :func:`add_entry` is the bare XADD of one payload, for the benchmark's raw Redis limit and
the chaos benchmark's crafted payloads (no trimming, no accounting).

One Lua script (atomic, so no other client interleaves):

1. ``XADD`` the frame; register the line in the lines index (first frame after (re)connecting);
2. bound the stream (``XTRIM MAXLEN [~] queue.maxlen``) and split the trimmed entries by the workers' group
   ``last-delivered-id``: entries AFTER it were never given to any worker (counted by ingest as
   ``frames_dropped{reason="trimmed_oldest"}``); entries up to it were delivered and are still pending (the
   worker holding one either publishes its result, or a reclaim reports it as deleted and the worker counts
   it as ``lineinspect_worker_frames_trimmed_total``), so they are not counted as dropped here. (The
   group's ``lag`` cannot be used: Redis does not lower it when entries are trimmed.)
3. the stream identity: the key ``{prefix}:{line}:identity`` holds a token made when the stream was first
   written. A Redis that restarted without its data (no AOF, or a failover to an empty replica) has no such
   key: the script makes a new one and says so, and the ingest that sees it counts the backlog it last saw
   (``backlog`` = stream length minus pending entries after its previous frame) as lost
   (``frames_dropped{reason="redis_lost"}``). Pending entries are not counted: their workers still publish
   results to the new server.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from stream.entries import PAYLOAD_FIELD
from stream.keys import LineKeys

log = logging.getLogger(__name__)

REGISTER_EVERY_S = 5.0  # line_tag layout: the line is added to the lines index this often (and on register)

# KEYS: frames, identity, lines index (plain layout only; with line_tag ARGV[7] is 0 and the caller SADDs)
# ARGV: payload field, payload, maxlen, approximate (1/0), group, new identity token, register (1/0), line
_ENQUEUE_LUA = """
local function id_lt(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function group_info(stream, name)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local m = {}
    for i = 1, #g, 2 do m[g[i]] = g[i + 1] end
    if m['name'] == name then return m end
  end
  return nil
end
local created = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[6])
  created = 1
end
local id = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
if ARGV[7] == '1' then redis.call('SADD', KEYS[3], ARGV[8]) end
local maxlen = tonumber(ARGV[3])
local len = redis.call('XLEN', KEYS[1])
local group = group_info(KEYS[1], ARGV[5])
local trimmed, delivered = 0, 0
if len > maxlen then
  local oldest_delivered = {}
  if group and group['last-delivered-id'] ~= '0-0' then
    oldest_delivered = redis.call('XRANGE', KEYS[1], '-', group['last-delivered-id'], 'COUNT', len - maxlen)
  end
  if ARGV[4] == '1' then
    trimmed = redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
  else
    trimmed = redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  end
  if trimmed > 0 and #oldest_delivered > 0 then
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
    for _, e in ipairs(oldest_delivered) do
      if #first == 0 or id_lt(e[1], first[1][1]) then delivered = delivered + 1 end
    end
  end
end
local pending = 0
if group then pending = group['pending'] end
local backlog = redis.call('XLEN', KEYS[1]) - pending
if backlog < 0 then backlog = 0 end
return {id, trimmed, trimmed - delivered, created, backlog}
"""


@dataclass(frozen=True)
class EnqueueReply:
    entry_id: str
    trimmed: int  # entries XTRIM removed
    trimmed_undelivered: int  # of them, never given to a worker: lost (trimmed_oldest)
    identity_created: bool  # the stream identity key was missing: first frame ever, or Redis lost its data
    backlog: int  # entries in the stream after this frame, minus the pending ones (undelivered, about)


def add_entry(client, stream: str, payload: bytes):
    """XADD one payload as a frame entry; its id (a pipeline: the pipeline, the id comes with its reply)."""
    return client.xadd(stream, {PAYLOAD_FIELD: payload})


class FrameProducer:
    """Adds frames of one camera to its line's stream (see the module doc)."""

    def __init__(self, client, keys: LineKeys, lines_index: str, *, maxlen: int, approximate: bool, group: str):
        self.client = client
        self.keys = keys
        self.lines_index = lines_index
        self.maxlen = maxlen
        self.approximate = approximate
        self.group = group
        self._script = client.register_script(_ENQUEUE_LUA)
        self._next_register = 0.0  # line_tag layout: monotonic time of the next SADD to the lines index

    def add(self, payload: bytes, *, register: bool) -> EnqueueReply:
        keys = [self.keys.frames, self.keys.identity]
        if self.keys.layout == "plain":  # one node: the lines index is added to in the same script
            keys.append(self.lines_index)
        else:  # line_tag: the index is in another slot (on a cluster maybe on another master, which may lose it
            # in a restart this ingest never notices): SADD on register and again
            # every REGISTER_EVERY_S, best effort: the index (read by the preview only) never costs a frame, even
            # while its master is down
            now = time.monotonic()
            if register or now >= self._next_register:
                self._next_register = now + REGISTER_EVERY_S
                import redis

                try:
                    self.client.sadd(self.lines_index, self.keys.line)
                except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
                    log.warning("lines index %s not updated (%s); again in %.0fs", self.lines_index, exc,
                                REGISTER_EVERY_S)
            register = False
        reply = self._script(
            keys=keys,
            args=[PAYLOAD_FIELD, payload, self.maxlen, 1 if self.approximate else 0, self.group,
                  uuid.uuid4().hex, 1 if register else 0, self.keys.line])
        entry_id, trimmed, undelivered, created, backlog = reply
        return EnqueueReply(entry_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
                            trimmed=int(trimmed), trimmed_undelivered=int(undelivered),
                            identity_created=bool(int(created)), backlog=int(backlog))
