"""Per-line normal memory in Redis: raw float16 patch bytes plus a small JSON header (no object pickling).

Keys (``stream.keys.line_keys(prefix, line).memory(part)``):

- ``memory:header``: JSON (:class:`MemoryHeader`): format version, feature source (``"sam:<model>"``),
  feature dim, feature options, calibrated thresholds, coverage radius, ``generation``.
- ``memory:feats``: float16 bytes, row-major ``[n, dim]`` (n = STRLEN / (2 * dim)).
- ``memory:radius``: float16 bytes ``[n]``: each patch's distance to the memory when it was selected
  (k-center order; the smallest are the most redundant and are dropped first when over the bound).
- ``memory:stats``: hash ``frames`` (frames that contributed), ``seen`` (patches offered, reservoir).
- ``memory:held_out``: list of the raw image maxima of the line's most recent OK frames, each scored against a
  memory that did not hold it (newest first, bounded): the image threshold is re-estimated from them
  (:mod:`workers.memory.calibration`).

Concurrency: a rewrite (build, compaction, reservoir replacement, recalibration) bumps ``generation``
under ``WATCH`` on the header key; an online addition APPENDs rows to ``feats``/``radius`` in a
``MULTI`` transaction guarded by ``WATCH`` on the header, so an addition that races a rewrite fails
with :class:`MemoryConflict` and is retried by the caller against the new generation. Readers take a
consistent snapshot in one transaction; other workers' additions are read incrementally with
``GETRANGE`` from the row count they already hold.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from stream.contracts import LineInspectError
from stream.keys import line_keys

MEMORY_FORMAT = 1
DTYPE = np.float16


class MemoryStoreError(LineInspectError):
    """Base of the memory store errors."""


class MemoryMismatchError(MemoryStoreError):
    """A stored memory was built from other features / options; ``reason`` says what differs."""

    def __init__(self, reason: str):
        super().__init__(f"stored memory refused: {reason}")
        self.reason = reason


class MemoryMissingError(MemoryStoreError):
    """The line has no stored memory and the configuration does not allow starting empty."""


class MemoryConflict(MemoryStoreError):
    """The stored memory was rewritten by another worker in the meantime (generation changed)."""


class MemoryCorrupt(MemoryStoreError):
    """Stored bytes do not match the header (length not a multiple of the row size, bad JSON)."""


@dataclass(frozen=True)
class MemoryHeader:
    source: str  # "sam:<backend name>" or "clip:<model>:<weights>"
    dim: int
    neighbourhood: int
    norm: str  # feature normalisation before the distance ("l2" or "none")
    policy: str  # "coreset" or "reservoir"
    max_patches: int
    radius: float = 0.0  # coverage radius: patches farther than this from memory are new
    image_threshold: float = 0.0  # raw image score (max of the smoothed raw map) of normal frames
    pixel_threshold: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)  # quantile, frames, method
    generation: int = 0
    format: int = MEMORY_FORMAT
    dtype: str = "float16"
    updated: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> MemoryHeader:
        try:
            data = json.loads(raw)
        except (ValueError, TypeError) as exc:
            raise MemoryCorrupt(f"memory header is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise MemoryCorrupt("memory header is not a JSON object")
        if data.get("format") != MEMORY_FORMAT:
            raise MemoryMismatchError(f"memory format {data.get('format')!r}, this build reads {MEMORY_FORMAT}")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise MemoryCorrupt(f"memory header incomplete: {exc}") from None

    def check_compatible(self, source: str, dim: int, neighbourhood: int, norm: str) -> None:
        """Raise :class:`MemoryMismatchError` when this memory cannot be compared with such features."""
        if self.source != source:
            raise MemoryMismatchError(f"built from features {self.source!r}, this worker computes {source!r}; "
                                      "run `lineinspect memory clear LINE` and fill it again")
        if self.dim != dim:
            raise MemoryMismatchError(f"feature dim {self.dim} stored, {dim} computed")
        if self.neighbourhood != neighbourhood:
            raise MemoryMismatchError(f"built with memory.neighbourhood={self.neighbourhood}, "
                                      f"configured {neighbourhood}")
        if self.norm != norm:
            raise MemoryMismatchError(f"built with feature normalisation {self.norm!r}, configured {norm!r}")
        if self.dtype != "float16":
            raise MemoryMismatchError(f"stored dtype {self.dtype!r}, expected float16")


@dataclass(frozen=True)
class StoredMemory:
    header: MemoryHeader
    feats: np.ndarray  # float16 [n, dim]
    radius: np.ndarray  # float16 [n]
    frames: int = 0
    seen: int = 0

    @property
    def n(self) -> int:
        return int(self.feats.shape[0])


def _rows(raw: bytes | None, dim: int, what: str) -> np.ndarray:
    raw = raw or b""
    row = 2 * dim
    if len(raw) % row:
        raise MemoryCorrupt(f"memory {what}: {len(raw)} bytes is not a multiple of {row}")
    return np.frombuffer(raw, dtype=DTYPE).reshape(-1, dim) if dim > 1 else np.frombuffer(raw, dtype=DTYPE)


class RedisMemoryStore:
    """The memory of one line in Redis. Constructing it does not touch Redis."""

    def __init__(self, client: Any, prefix: str, line: str, layout: str | None = None):
        self.client = client
        self.line = line
        # redis.key_layout: given, or the one stream.redisclient.make_client noted on the client (plain if none)
        layout = layout or getattr(client, "lineinspect_key_layout", "plain")
        keys = line_keys(prefix, line, layout)
        self.k_header = keys.memory("header")
        self.k_feats = keys.memory("feats")
        self.k_radius = keys.memory("radius")
        self.k_stats = keys.memory("stats")
        self.k_held_out = keys.memory("held_out")

    # ------------------------------------------------------------------------------------- reads
    def load(self) -> StoredMemory | None:
        """A consistent snapshot, or None when the line has no memory."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.k_header)
        pipe.get(self.k_feats)
        pipe.get(self.k_radius)
        pipe.hgetall(self.k_stats)
        raw_header, raw_feats, raw_radius, stats = pipe.execute()
        if raw_header is None:
            return None
        header = MemoryHeader.from_json(raw_header)
        feats = _rows(raw_feats, header.dim, "feats")
        radius = _rows(raw_radius, 1, "radius")
        if len(radius) != len(feats):
            raise MemoryCorrupt(f"memory has {len(feats)} feature rows but {len(radius)} radii")
        return StoredMemory(header, feats, radius, frames=int(stats.get(b"frames", 0)),
                            seen=int(stats.get(b"seen", 0)))

    def header(self) -> MemoryHeader | None:
        raw = self.client.get(self.k_header)
        return None if raw is None else MemoryHeader.from_json(raw)

    def tail(self, generation: int, have_rows: int) -> StoredMemory | None:
        """Rows appended after the first ``have_rows`` of ``generation``; None if the memory was rewritten
        (or deleted) since, in which case the caller loads it again."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.k_header)
        pipe.strlen(self.k_feats)
        pipe.hgetall(self.k_stats)
        raw_header, nbytes, stats = pipe.execute()
        if raw_header is None:
            return None
        header = MemoryHeader.from_json(raw_header)
        if header.generation != generation:
            return None
        row = 2 * header.dim
        n_now = nbytes // row
        if n_now <= have_rows:
            return StoredMemory(header, np.zeros((0, header.dim), DTYPE), np.zeros(0, DTYPE),
                                frames=int(stats.get(b"frames", 0)), seen=int(stats.get(b"seen", 0)))
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.k_header)
        pipe.getrange(self.k_feats, have_rows * row, n_now * row - 1)
        pipe.getrange(self.k_radius, have_rows * 2, n_now * 2 - 1)
        raw_header2, raw_feats, raw_radius = pipe.execute()
        if raw_header2 != raw_header:  # rewritten between the two reads
            return None
        feats = _rows(raw_feats, header.dim, "feats")
        radius = _rows(raw_radius, 1, "radius")
        if len(radius) != len(feats):
            raise MemoryCorrupt("memory tail: feats and radius lengths differ")
        return StoredMemory(header, feats, radius, frames=int(stats.get(b"frames", 0)),
                            seen=int(stats.get(b"seen", 0)))

    # ------------------------------------------------------------------------------------- writes
    def save(self, header: MemoryHeader, feats: np.ndarray, radius: np.ndarray, *, frames: int, seen: int,
             expect_generation: int | None) -> MemoryHeader:
        """Rewrite the whole memory; ``generation`` becomes stored + 1. ``expect_generation`` None: only if no
        memory is stored; an int: only if that generation is still stored (else :class:`MemoryConflict`)."""
        import redis

        feats = np.ascontiguousarray(feats, dtype=DTYPE)
        radius = np.ascontiguousarray(radius, dtype=DTYPE).reshape(-1)
        if feats.ndim != 2 or feats.shape[1] != header.dim or len(radius) != len(feats):
            raise ValueError(f"feats {feats.shape} / radius {radius.shape} do not match dim {header.dim}")
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.k_header)
                raw = pipe.get(self.k_header)
                current = None if raw is None else MemoryHeader.from_json(raw).generation
                if current != expect_generation:
                    raise MemoryConflict(f"memory of line {self.line!r} is at generation {current}, "
                                         f"expected {expect_generation}")
                new = replace(header, generation=(current or 0) + 1, updated=time.time())
                pipe.multi()
                pipe.set(self.k_header, new.to_json())
                pipe.set(self.k_feats, feats.tobytes())
                pipe.set(self.k_radius, radius.tobytes())
                pipe.delete(self.k_stats)
                pipe.hset(self.k_stats, mapping={"frames": int(frames), "seen": int(seen)})
                pipe.execute()
            except redis.WatchError:
                raise MemoryConflict(f"memory of line {self.line!r} changed during the rewrite") from None
        return new

    def append(self, generation: int, feats: np.ndarray, radius: np.ndarray, *, frames: int = 1,
               seen: int = 0) -> int:
        """Append rows to the memory of ``generation`` atomically; returns the row count after it.
        Raises :class:`MemoryConflict` when the memory was rewritten (or deleted) meanwhile."""
        import redis

        feats = np.ascontiguousarray(feats, dtype=DTYPE)
        radius = np.ascontiguousarray(radius, dtype=DTYPE).reshape(-1)
        if len(radius) != len(feats):
            raise ValueError("feats and radius lengths differ")
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.k_header)
                raw = pipe.get(self.k_header)
                if raw is None:
                    raise MemoryConflict(f"memory of line {self.line!r} was deleted")
                header = MemoryHeader.from_json(raw)
                if header.generation != generation:
                    raise MemoryConflict(f"memory of line {self.line!r} is at generation {header.generation}, "
                                         f"this worker holds {generation}")
                pipe.multi()
                if len(feats):
                    pipe.append(self.k_feats, feats.tobytes())
                    pipe.append(self.k_radius, radius.tobytes())
                else:
                    pipe.strlen(self.k_feats)
                    pipe.strlen(self.k_radius)
                pipe.hincrby(self.k_stats, "frames", int(frames))
                pipe.hincrby(self.k_stats, "seen", int(seen))
                nbytes = pipe.execute()[0]
            except redis.WatchError:
                raise MemoryConflict(f"memory of line {self.line!r} changed during the addition") from None
        return int(nbytes) // (2 * header.dim)

    def push_held_out(self, values: list[float], capacity: int) -> None:
        """Add held-out normal maxima (newest first), keeping the ``capacity`` most recent."""
        if not values:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self.k_held_out, *(repr(float(v)) for v in values))
        pipe.ltrim(self.k_held_out, 0, max(0, capacity - 1))
        pipe.execute()

    def held_out(self) -> list[float]:
        return [float(v) for v in self.client.lrange(self.k_held_out, 0, -1)]

    def clear_held_out(self) -> None:
        self.client.delete(self.k_held_out)

    def clear(self) -> int:
        return int(self.client.delete(self.k_header, self.k_feats, self.k_radius, self.k_stats, self.k_held_out))
