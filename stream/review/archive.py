"""What a line keeps of each judged frame for operator review: the frame payload exactly as the worker got it
and the result payload it published, keyed by frame id, bounded in bytes per line (oldest dropped first).

Keys (:meth:`stream.keys.LineKeys.review`), all of one line, so that one Lua script touches one cluster slot
with ``redis.key_layout: line_tag``:

- ``review:frames`` hash frame id -> frame payload (``stream.wire`` frame bytes)
- ``review:results`` hash frame id -> result payload (``stream.wire`` result bytes)
- ``review:index`` sorted set of frame ids, scored by the time the result was published
- ``review:defects`` the same for the DEFECT verdicts only (the preview lists them)
- ``review:bytes`` the payload bytes held (frames + results)

:meth:`ReviewArchive.keep` adds (or replaces) one frame and drops the oldest ones while the line holds more
than ``max_bytes``, in one script: readers never see a frame without its result, and the bound holds after
every call. A frame larger than the whole bound is not kept (``KeptFrame.kept`` False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream.keys import LineKeys

_KEEP_LUA = """
local frames, results, index, defects, total_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = ARGV[1]
local old = redis.call('HSTRLEN', frames, id) + redis.call('HSTRLEN', results, id)
redis.call('HSET', frames, id, ARGV[2])
redis.call('HSET', results, id, ARGV[3])
redis.call('ZADD', index, ARGV[4], id)
if ARGV[6] == '1' then redis.call('ZADD', defects, ARGV[4], id) else redis.call('ZREM', defects, id) end
local total = redis.call('INCRBY', total_key, string.len(ARGV[2]) + string.len(ARGV[3]) - old)
local limit = tonumber(ARGV[5])
local dropped = 0
while total > limit do
  local oldest = redis.call('ZPOPMIN', index)
  if #oldest == 0 then
    redis.call('SET', total_key, 0)
    total = 0
    break
  end
  local oid = oldest[1]
  local n = redis.call('HSTRLEN', frames, oid) + redis.call('HSTRLEN', results, oid)
  redis.call('HDEL', frames, oid)
  redis.call('HDEL', results, oid)
  redis.call('ZREM', defects, oid)
  total = redis.call('DECRBY', total_key, n)
  dropped = dropped + 1
end
return {dropped, total, redis.call('ZCARD', index), redis.call('HEXISTS', frames, id)}
"""

PARTS = ("frames", "results", "index", "defects", "bytes")


@dataclass(frozen=True)
class KeptFrame:
    """What one :meth:`ReviewArchive.keep` did: frames dropped to stay in the bound, what the line holds now,
    and whether the frame itself is kept (False: larger than the whole bound)."""

    dropped: int
    bytes: int
    frames: int
    kept: bool


@dataclass(frozen=True)
class KeptEntry:
    """One kept frame: its id, when its result was published, and the two payloads (``frame`` empty when
    only the results were asked for)."""

    frame_id: str
    ts: float
    frame: bytes
    result: bytes


class ReviewArchive:
    """The review window of one line (``keys``), bounded by ``max_bytes``. Constructing it touches nothing."""

    def __init__(self, client: Any, keys: LineKeys, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.client = client
        self.keys = keys
        self.max_bytes = int(max_bytes)
        self._script = None

    def _keys(self) -> list[str]:
        return [self.keys.review(p) for p in PARTS]

    def keep(self, frame_id: str, frame_payload: bytes, result_payload: bytes, ts: float,
             defect: bool) -> KeptFrame:
        """Keep one frame and its result (replacing an earlier copy of the same frame id); the oldest frames are
        dropped while the line holds more than ``max_bytes``."""
        if self._script is None:
            self._script = self.client.register_script(_KEEP_LUA)
        dropped, total, count, kept = self._script(
            keys=self._keys(), args=[frame_id, frame_payload, result_payload, repr(float(ts)), self.max_bytes,
                                     "1" if defect else "0"])
        return KeptFrame(int(dropped), int(total), int(count), bool(int(kept)))

    def get(self, frame_id: str) -> KeptEntry | None:
        """The kept frame and result of ``frame_id``, or None when it is not (or no longer) kept."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.keys.review("frames"), frame_id)
        pipe.hget(self.keys.review("results"), frame_id)
        pipe.zscore(self.keys.review("index"), frame_id)
        frame, result, ts = pipe.execute()
        if frame is None or result is None:
            return None
        return KeptEntry(frame_id, float(ts or 0.0), bytes(frame), bytes(result))

    def recent(self, n: int, defects_only: bool = False) -> list[KeptEntry]:
        """The ``n`` most recently kept frames (newest first), or only those judged DEFECT; payloads of their
        results only (``frame`` is empty)."""
        if n <= 0:
            return []
        index = self.keys.review("defects" if defects_only else "index")
        ids = self.client.zrevrange(index, 0, n - 1, withscores=True)
        if not ids:
            return []
        results = self.client.hmget(self.keys.review("results"), [fid for fid, _ in ids])
        out = []
        for (fid, ts), res in zip(ids, results, strict=True):
            if res is not None:  # dropped between the two reads
                out.append(KeptEntry(fid.decode() if isinstance(fid, bytes) else str(fid), float(ts), b"",
                                     bytes(res)))
        return out

    def stats(self) -> tuple[int, int]:
        """(bytes held, frames held)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.review("bytes"))
        pipe.zcard(self.keys.review("index"))
        total, count = pipe.execute()
        return int(total or 0), int(count)

    def window_mib(self) -> float:
        return self.max_bytes / (1 << 20)
