"""Chaos benchmark: real ingest and worker processes against a private Redis, under faults, and one table that
accounts for every frame. ``lineinspect bench --chaos`` (no Redis of yours is touched).

Scenarios (each on its own ``redis-server`` on a free port, 2 noop workers unless said):
- ``crash_loop``: ingest at 25 fps; every ``--kill-every`` seconds one worker is SIGKILLed and a new one started;
- ``restart_no_aof`` / ``restart_aof``: 1 slow worker (a backlog builds up), Redis restarted (SIGTERM) with
  and without an append-only file;
- ``redis_full``: ``maxmemory`` 1 MB above what the empty Redis uses (noeviction), 1 slow worker;
- ``frozen``: Redis stopped with SIGSTOP for 2 s, then SIGCONT;
- ``fuzz``: ``--fuzz`` crafted payloads (random bytes, random headers with NaN, huge integers, deep nesting,
  lone surrogates, bit flips of valid frames) with a good frame every 1000, straight into the stream.

Results and dead letters are tailed while the scenario runs (a restarted Redis loses its streams). The
columns: ``in`` frames captured by ingest (fuzz: payloads added); ``results`` distinct frame ids with a
result; ``dup`` results beyond one per frame id; ``dead`` dead-lettered; ``dropped`` ingest's drops by reason
(a ``redis_unconfirmed`` frame may have been queued all the same, a ``redis_lost`` or trimmed one may have
been taken by a worker just before: when such a frame also got a result it counts as ``late``, bounded by
the unconfirmed drops plus the workers' orphan results); ``w_trim`` frames
trimmed while a worker held them (worker logs); ``queued`` left in the stream; ``uncounted`` = in - results
- dead - dropped - w_trim - queued (+ late); ``crashes`` processes that died on their own or logged a
traceback; ``recovery_s`` from Redis answering again (restart, thaw) to the next result.
"""

from __future__ import annotations

import argparse
import random
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stream.chaos_procs import PrivateRedis, Procs, ingest_stats
from stream.keys import line_keys
from stream.producer import add_entry
from stream.reader import FROM_START, StreamCursor, follow

KEYS = line_keys("chaos", "L1")
DROP_REASONS = ("trimmed", "redis", "oom", "unconfirmed", "lost", "encode")


class Tail(threading.Thread):
    """Reads the results and dead-letter streams as they grow, across Redis restarts; notes arrival times."""

    def __init__(self, redis_: PrivateRedis):
        super().__init__(daemon=True)
        self.redis = redis_
        self.frame_ids: list[str] = []
        self.result_times: list[float] = []
        self.dead = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import redis

        from stream.wire import decode_result

        cursor = StreamCursor({KEYS.results: FROM_START, KEYS.dead_letter: FROM_START})
        client = None
        while not self.stop.is_set():
            try:
                client = client or self.redis.client(2.0)
                for entry in follow(client, cursor, count=1000, block_ms=100):
                    if entry.stream == KEYS.results:
                        self.frame_ids.append(decode_result(entry.payload).frame_id)
                        self.result_times.append(time.monotonic())
                    else:
                        self.dead += 1
            except (redis.RedisError, OSError):
                client = None
                self.stop.wait(0.02)

    def first_result_after(self, t: float) -> float | None:
        later = [x for x in self.result_times if x >= t]
        return min(later) - t if later else None


@dataclass
class Row:
    scenario: str
    frames_in: int = 0
    results: int = 0
    dup: int = 0
    dead: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    w_trim: int = 0
    queued: int = 0
    late: int = 0
    skipped: int = 0  # fuzz: payloads whose frame id already had a result (acknowledged, no second result)
    uncounted: int = 0
    crashes: int = 0
    recovery_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""


def _images(folder: Path, n: int = 8, side: int = 96) -> Path:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    return folder


def _config(redis_: PrivateRedis, images: Path, fps: float) -> dict:
    return {
        "redis": {"url": redis_.url, "key_prefix": "chaos", "socket_timeout_s": 1.0},
        "metrics": {"enabled": False},
        "queue": {"maxlen": 2000, "block_ms": 100, "claim_interval_s": 0.2, "claim_idle_ms": 1500,
                  "max_deliveries": 3, "job_timeout_s": 30, "results_maxlen": 10_000_000,
                  "dead_letter_maxlen": 10_000_000, "dead_consumer_idle_s": 5},
        "cameras": [{"id": "cam", "line": "L1", "source": "folder", "path": str(images), "loop": True,
                     "fps": fps, "encoding": "jpeg", "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5}],
    }


def _drain(redis_: PrivateRedis, timeout: float = 90.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = redis_.client()
            if c.xlen(KEYS.frames) == 0 and c.xpending(KEYS.frames, "workers")["pending"] == 0:
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)


def _account(row: Row, redis_: PrivateRedis, procs: Procs, tail: Tail, ingest_text: str | None) -> Row:
    time.sleep(0.5)  # the tail catches up
    tail.stop.set()
    tail.join(5)
    row.recovery_s = [d for d in (tail.first_result_after(t) for t in row.recovery_s) if d is not None]
    row.results = len(set(tail.frame_ids))
    row.dup = len(tail.frame_ids) - row.results
    row.dead = tail.dead
    row.queued = redis_.client().xlen(KEYS.frames)
    row.w_trim = procs.worker_trimmed()
    row.crashes = procs.crashes()
    if ingest_text is not None:
        s = ingest_stats(ingest_text)
        row.frames_in = s.get("captured", 0)
        row.dropped = {r: s.get(f"dropped_{r}", 0) for r in DROP_REASONS if s.get(f"dropped_{r}", 0)}
    gap = row.frames_in - row.results - row.dead - sum(row.dropped.values()) - row.w_trim - row.queued
    if row.scenario == "fuzz":  # distinct payloads may share a frame id: one result, the others skipped
        row.skipped = procs.skipped()
        gap -= row.skipped
    if gap < 0 and -gap <= row.dropped.get("unconfirmed", 0) + procs.orphans():
        row.late, gap = -gap, 0
    row.uncounted = gap
    return row


def _run(name: str, workdir: Path, body, *, aof: bool = False, headroom: int = 0, fps: float = 25.0,
         workers: int = 2, detector: str = "noop") -> Row:
    wd = workdir / name
    wd.mkdir(parents=True)
    redis_ = PrivateRedis(wd, aof=aof)
    redis_.start()
    if headroom:  # maxmemory (noeviction) this many bytes above what the empty server uses
        c = redis_.client()
        c.config_set("maxmemory", str(int(c.info("memory")["used_memory"]) + headroom))
    procs = Procs(wd, _config(redis_, _images(wd / "images"), fps))
    tail = Tail(redis_)
    tail.start()
    row = Row(name)
    t0 = time.monotonic()
    try:
        ws = [procs.worker(f"w{i}", detector) for i in range(workers)]
        ingest = procs.spawn("ingest", "--camera", "cam")
        body(row, redis_, procs, ws)
        procs.stop(ingest)
        _drain(redis_)
        for p in procs.procs:
            procs.stop(p)
        row.seconds = time.monotonic() - t0
        return _account(row, redis_, procs, tail, procs.output(ingest))
    finally:
        procs.cleanup()
        redis_.stop()


def crash_loop(seconds: float, kill_every: float):
    def body(row, redis_, procs, ws):
        end, n = time.monotonic() + seconds, len(ws)
        while time.monotonic() < end:
            time.sleep(kill_every)
            victim = ws.pop(0)
            procs.kill(victim)
            ws.append(procs.worker(f"w{n}"))
            n += 1
        row.note = f"{n - 2} workers SIGKILLed"
    return body


def restart(seconds: float):
    def body(row, redis_, procs, ws):
        time.sleep(seconds / 2)
        redis_.stop()
        time.sleep(1.0)
        t_up = redis_.start()
        time.sleep(seconds / 2)
        row.recovery_s.append(t_up)  # turned into a delay once the tail has the results
    return body


def frozen(seconds: float):
    def body(row, redis_, procs, ws):
        time.sleep(seconds / 2)
        redis_.freeze()
        time.sleep(2.0)
        redis_.thaw()
        row.recovery_s.append(time.monotonic())
        time.sleep(seconds / 2)
    return body


def full(seconds: float):
    def body(row, redis_, procs, ws):
        time.sleep(seconds)
    return body


def _fuzz_payloads(n: int, seed: int = 0):
    """Crafted frame payloads (never pickles): what a hostile or broken producer could write."""
    import json

    import numpy as np

    from stream import wire
    from stream.contracts import Encoding

    rng = random.Random(seed)
    good = wire.encode_frame(wire.image_to_frame(np.full((8, 8, 3), 7, np.uint8), line_id="L1", camera_id="fz",
                                                 seq=0, session="f", capture_ts=1.0, encoding=Encoding.RAW))
    values = [float("nan"), float("inf"), 10 ** 400, -1, 0, 2 ** 64, True, None, "\ud800", "x" * 300, [], {},
              [[[[[[[[[[1]]]]]]]]]], [4294967296, 4294967296, 3], [True, True], 1e308, "jpeg", "raw"]
    fields = ["line", "camera", "seq", "session", "ts", "enc", "shape"]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        elif kind == 1:
            blob = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(len(blob))] = rng.getrandbits(8)
            yield bytes(blob)
        else:
            header = {"line": "L1", "camera": "fz", "seq": i, "session": "f", "ts": 1.0, "enc": "raw",
                      "shape": [8, 8, 3]}
            header[rng.choice(fields)] = rng.choice(values)
            if kind == 3:
                header[rng.choice(fields)] = rng.choice(values)
            head = json.dumps(header).encode("utf-8", "surrogatepass")
            if rng.random() < 0.05:
                head = b"[" * rng.randint(10, 100_000)
            yield struct.pack(">2sBcI", b"LI", 1, b"F", len(head)) + head + b"\x07" * 192


def fuzz_scenario(workdir: Path, n: int) -> Row:
    from stream import wire
    from stream.contracts import Encoding

    wd = workdir / "fuzz"
    wd.mkdir(parents=True)
    redis_ = PrivateRedis(wd)
    redis_.start()
    procs = Procs(wd, _config(redis_, _images(wd / "images"), 25.0))
    tail = Tail(redis_)
    tail.start()
    row = Row("fuzz")
    try:
        import numpy as np

        client = redis_.client(30)
        from stream.queue import ensure_group

        ensure_group(client, KEYS.frames, "workers")
        pipe, added, good = client.pipeline(transaction=False), 0, 0
        for i, payload in enumerate(_fuzz_payloads(n)):
            if i % 1000 == 999:
                img = np.full((16, 16, 3), i % 255, np.uint8)
                add_entry(pipe, KEYS.frames, wire.encode_frame(wire.image_to_frame(
                    img, line_id="L1", camera_id="good", seq=i, session="g", capture_ts=time.time(),
                    encoding=Encoding.RAW)))
                good += 1
            add_entry(pipe, KEYS.frames, payload)
            added += 1
            if added % 1000 == 0:
                pipe.execute()
        pipe.execute()
        t0 = time.monotonic()
        ws = [procs.worker(f"w{i}") for i in range(2)]
        _drain(redis_, timeout=max(120.0, n / 200))
        row.seconds = time.monotonic() - t0
        for w in ws:
            procs.stop(w)
        row.frames_in = added + good
        _account(row, redis_, procs, tail, None)
        good_results = sum(1 for f in set(tail.frame_ids) if f.startswith("good:"))
        row.note = (f"{good_results}/{good} good frames answered; {row.skipped} skipped (frame id answered "
                    f"already); {row.dead / max(row.seconds, 1e-9):.0f} dead letters/s")
        return row
    finally:
        procs.cleanup()
        redis_.stop()


def _table(rows: list[Row]) -> str:
    head = ["scenario", "in", "results", "dup", "dead", "dropped", "w_trim", "queued", "late", "uncounted",
            "crashes", "recovery_s", "s", "note"]
    lines = []
    for r in rows:
        dropped = " ".join(f"{k}={v}" for k, v in r.dropped.items()) or "0"
        rec = ",".join(f"{x:.2f}" for x in r.recovery_s) if r.recovery_s else "-"
        lines.append([r.scenario, r.frames_in, r.results, r.dup, r.dead, dropped, r.w_trim, r.queued, r.late,
                      r.uncounted, r.crashes, rec, f"{r.seconds:.0f}", r.note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = " | ".join(f"{{:{'<' if i in (0, 5, 13) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*map(str, line)) for line in lines]
    return "\n".join(out)


SCENARIOS = ("crash_loop", "restart_no_aof", "restart_aof", "redis_full", "frozen", "fuzz")


def run_chaos(scenarios: list[str], *, seconds: float = 12.0, kill_every: float = 5.0, fuzz: int = 100_000,
              workdir: Path | None = None) -> list[Row]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lineinspect-chaos-"))
    rows = []
    for name in scenarios:
        if name == "crash_loop":
            row = _run(name, workdir, crash_loop(seconds * 2, kill_every))
        elif name in ("restart_no_aof", "restart_aof"):
            row = _run(name, workdir, restart(seconds), aof=name == "restart_aof", workers=1, detector="slow:0.08")
        elif name == "redis_full":
            row = _run(name, workdir, full(seconds), headroom=1_000_000, workers=1, detector="slow:0.08")
        elif name == "frozen":
            row = _run(name, workdir, frozen(seconds))
        elif name == "fuzz":
            row = fuzz_scenario(workdir, fuzz)
        else:
            raise ValueError(f"unknown chaos scenario {name!r} (known: {', '.join(SCENARIOS)})")
        rows.append(row)
        print(f"chaos: {name} done in {row.seconds:.0f}s", flush=True)
    return rows


def main(args: argparse.Namespace) -> int:
    names = [s for s in (getattr(args, "scenarios", "") or ",".join(SCENARIOS)).split(",") if s]
    rows = run_chaos(names, seconds=float(getattr(args, "chaos_seconds", 12.0)),
                     kill_every=float(getattr(args, "kill_every", 5.0)), fuzz=int(getattr(args, "fuzz", 100_000)))
    print(_table(rows), flush=True)
    bad = [r.scenario for r in rows if r.uncounted or r.dup or r.crashes or any(x > 1.0 for x in r.recovery_s)]
    print("chaos: every frame accounted for, no duplicates, no crashes, recovery <= 1 s" if not bad
          else f"chaos: FAILED in {', '.join(bad)}", flush=True)
    return 1 if bad else 0
