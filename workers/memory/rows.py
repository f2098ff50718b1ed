"""The line's memory as one process holds it: its rows (torch float32, with their search index), their radii,
its header and counters, and their sync with the store (:mod:`workers.memory.store`): a worker picks up other
workers' additions and rewrites, appends its own online additions atomically and rewrites the memory under
``WATCH``; the held-out window of OK frames (:mod:`workers.memory.held_out`) is read with it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from workers.memory.held_out import HeldOutWindow
from workers.memory.params import MemoryParams
from workers.memory.search import MemorySearch, make_search
from workers.memory.search import torch_module as _torch
from workers.memory.store import (
    MemoryConflict,
    MemoryHeader,
    MemoryMismatchError,
    RedisMemoryStore,
    StoredMemory,
)

log = logging.getLogger(__name__)


class MemoryRows:
    """``on_set`` is called whenever a whole memory replaces the one held (built, adopted, rewritten)."""

    def __init__(self, source: str, params: MemoryParams, store: RedisMemoryStore | None,
                 on_set: Callable[[], None] = lambda: None):
        self.source = source
        self.params = params
        self.store = store
        self.on_set = on_set
        self.header: MemoryHeader | None = None
        self.frames = 0
        self.seen = 0
        self._mem = None  # torch float32 [n, C]
        self._mem_sq = None
        self._search = make_search(self.params.search)  # scoring: holds the memory (and its index) on its device
        self._radius = np.zeros(0, np.float16)
        self._synced = 0.0
        # recent OK frames' raw maxima (newest first; in Redis with a store) and the threshold they give
        self.held_out = HeldOutWindow(store, params.held_out_frames, params.false_alarm_rate)

    @property
    def size(self) -> int:
        return 0 if self._mem is None else int(self._mem.shape[0])

    @property
    def feats(self):
        """The rows, torch float32 [n, C] (None while there is no memory)."""
        return self._mem

    @property
    def feats_sq(self):
        """Each row's squared norm, torch float32 [n]."""
        return self._mem_sq

    @property
    def radius(self) -> np.ndarray:
        """Each row's radius (float16 [n]): its distance to the memory when it was picked."""
        return self._radius

    @property
    def search(self) -> MemorySearch:
        """The ``memory.search`` index over the rows."""
        return self._search

    def memory_bytes(self) -> bytes:
        """The memory rows as stored (float16 bytes)."""
        return b"" if self._mem is None else self._mem.numpy().astype(np.float16).tobytes()

    def set(self, header: MemoryHeader, feats: np.ndarray, radius: np.ndarray, frames: int = 0,
                    seen: int = 0) -> None:
        torch = _torch()
        self.header = header
        self._mem = torch.from_numpy(np.asarray(feats, np.float16).astype(np.float32))
        self._mem_sq = (self._mem * self._mem).sum(1)
        self._search.reset(self._mem)
        self._radius = np.asarray(radius, np.float16).copy()
        self.frames, self.seen = int(frames), int(seen)
        self.held_out.invalidate()
        self.on_set()

    def append(self, feats: np.ndarray, radius: np.ndarray) -> None:
        torch = _torch()
        if len(feats) == 0:
            return
        new = torch.from_numpy(np.asarray(feats, np.float16).astype(np.float32))
        self._mem = torch.cat([self._mem, new])
        self._mem_sq = torch.cat([self._mem_sq, (new * new).sum(1)])
        self._search.add(new, memory=self._mem)
        self._radius = np.concatenate([self._radius, np.asarray(radius, np.float16)])

    def adopt(self, stored: StoredMemory) -> None:
        """Use a stored memory (after checking that it was built from the same kind of features)."""
        stored.header.check_compatible(self.source, stored.feats.shape[1] if stored.n else stored.header.dim,
                                       self.params.neighbourhood, self.params.norm)
        self.set(stored.header, stored.feats, stored.radius, stored.frames, stored.seen)
        if self.store is not None:
            self.held_out.load()
        self._synced = time.monotonic()

    def reload(self) -> bool:
        """Pick up other workers' additions (incremental) or rewrites (full), and the line's held-out normal
        maxima. True if the memory changed."""
        self._synced = time.monotonic()
        if self.store is None:
            return False
        self.held_out.sync()
        if self.header is None:
            stored = self.store.load()
            if stored is None:
                return False
            self.adopt(stored)
            return True
        tail = self.store.tail(self.header.generation, self.size)
        if tail is None:
            stored = self.store.load()
            if stored is None:  # cleared by an operator: back to warm-up / empty
                log.warning("memory of line %s was cleared; starting empty", self.store.line)
                self.header, self._mem, self._mem_sq = None, None, None
                self._radius = np.zeros(0, np.float16)
                return True
            self.adopt(stored)
            return True
        self.frames, self.seen = tail.frames, tail.seen
        if tail.n:
            self.append(tail.feats, tail.radius)
            return True
        return False

    def maybe_reload(self) -> None:
        if self.store is not None and time.monotonic() - self._synced >= self.params.reload_interval_s:
            try:
                self.reload()
            except MemoryMismatchError:
                raise
            except Exception as exc:  # Redis down: keep scoring with what we hold
                log.warning("memory reload failed (%s); using the memory held in this worker", exc)
                self._synced = time.monotonic()

    def save(self) -> MemoryHeader:
        """Write the whole memory to the store (a new generation)."""
        if self.store is None or self.header is None:
            raise RuntimeError("nothing to save (no store or no memory)")
        stored = self.store.header()
        return self.save_over(None if stored is None else stored.generation)

    def save_over(self, expect_generation: int | None) -> MemoryHeader:
        """Write the whole memory to the store over its generation ``expect_generation`` (None: only if the line
        has no memory); :class:`MemoryConflict` when another one is stored now."""
        self.header = self.store.save(self.header, self._mem.numpy(), self._radius, frames=self.frames,
                                      seen=self.seen, expect_generation=expect_generation)
        self._synced = time.monotonic()
        return self.header

    def save_first(self) -> None:
        """Store this memory as the line's first one (warm-up); when another worker stored one first, use that."""
        if self.store is not None:
            try:
                self.save_over(None)
            except MemoryConflict:  # another worker stored its warm-up memory first: use that one
                stored = self.store.load()
                if stored is not None:
                    self.adopt(stored)
        self._synced = time.monotonic()

    def persist_append(self, rows: np.ndarray, radius: np.ndarray, seen: int) -> None:
        """Add rows online (with a store: appended atomically, retried against a rewrite, other workers'
        additions since the last sync taken along)."""
        if self.store is None:
            self.append(rows, radius)
            self.frames += 1
            self.seen += seen
            return
        for _attempt in range(3):
            before = self.size
            try:
                self.store.append(self.header.generation, rows, radius, frames=1, seen=seen)
            except MemoryConflict:
                self.reload()  # rewritten by another worker: take the new generation, add again
                continue
            tail = self.store.tail(self.header.generation, before)
            if tail is None:  # rewritten right after our append: it contains our rows
                self.reload()
            else:  # our rows plus whatever others appended since our last sync, in stored order
                self.append(tail.feats, tail.radius)
                self.frames, self.seen = tail.frames, tail.seen
            self._synced = time.monotonic()
            return
        log.warning("memory addition dropped after 3 conflicts")

    def rewrite(self, feats: np.ndarray, radius: np.ndarray, header: MemoryHeader) -> None:
        """Replace the memory (a new generation); when another worker rewrote it first, take theirs."""
        if self.store is None:
            self.set(header, feats, radius, self.frames, self.seen)
            return
        try:
            new = self.store.save(header, feats, radius, frames=self.frames, seen=self.seen,
                                  expect_generation=self.header.generation)
            self.set(new, feats, radius, self.frames, self.seen)
        except MemoryConflict:  # someone else rewrote it: take theirs (it is bounded too)
            self.reload()
        self._synced = time.monotonic()


