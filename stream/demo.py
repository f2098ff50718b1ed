"""``lineinspect demo``: the whole pipeline on this machine, on the bundled hazelnut_toy images.

1. Uses the configured Redis if it answers, else starts a private ``redis-server`` (stream.localredis).
2. Lays the bundled test images out as a conveyor (good and defective parts interleaved).
3. Fills the line's normal memory from the bundled ``train/good`` images (``lineinspect memory add``).
4. Starts worker process(es) with the real detector and waits until they are up, then one ingest process.
5. Prints every verdict as it arrives, writes overlays, and ends with a summary: frames, defects found
   (against the images' known labels), throughput and latency percentiles, per-stage times.
6. Stops every process it started and deletes its keys.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from config.settings import Settings, to_dict
from stream.contracts import InspectionResult, Verdict
from stream.keys import line_keys
from stream.localredis import ensure_redis
from stream.redact import redact_url
from stream.redisclient import make_client
from stream.results import ResultFollower, format_result, write_overlay

DEMO_DATA = Path(__file__).with_name("demo_data") / "hazelnut_toy"
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
LINE = "demo"
CAMERA = "conveyor"


@dataclass(frozen=True)
class ConveyorItem:
    seq: int
    path: Path
    defective: bool


def lay_out_conveyor(test_dir: Path, dest: Path, limit: int = 0) -> list[ConveyorItem]:
    """Interleave good and defective test images into ``dest`` (symlinks named by conveyor order)."""
    good = sorted(p for p in (test_dir / "good").iterdir() if p.suffix.lower() in IMAGE_EXTS)
    bad = sorted(p for d in sorted(test_dir.iterdir()) if d.is_dir() and d.name != "good"
                 for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    order: list[tuple[Path, bool]] = []
    gi = bi = 0
    while gi < len(good) or bi < len(bad):  # roughly one good part every few defective ones, like a demo belt
        for _ in range(3):
            if bi < len(bad):
                order.append((bad[bi], True))
                bi += 1
        if gi < len(good):
            order.append((good[gi], False))
            gi += 1
    if limit:
        order = order[:limit]
    dest.mkdir(parents=True, exist_ok=True)
    items = []
    for seq, (src, defective) in enumerate(order):
        link = dest / f"{seq:04d}_{src.parent.name}_{src.name}"
        link.symlink_to(src.resolve())
        items.append(ConveyorItem(seq, link, defective))
    return items


def _spawn(config: Path, *args: str, log_path: Path | None = None) -> subprocess.Popen:
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(config), *args],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def mask_share(mask_png: bytes) -> float:
    """Share of the frame covered by a result's published label mask (PNG bytes)."""
    import cv2

    mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    return float(np.count_nonzero(mask)) / mask.size if mask is not None and mask.size else 0.0


def summarise(items: list[ConveyorItem], results: dict[int, InspectionResult], wall_s: float,
              dead_lettered: int) -> dict:
    tp = sum(1 for it in items if it.seq in results and it.defective and results[it.seq].verdict is Verdict.DEFECT)
    fp = sum(1 for it in items if it.seq in results and not it.defective
             and results[it.seq].verdict is Verdict.DEFECT)
    n_bad = sum(it.defective for it in items)
    lat = [r.latency_s for r in results.values()]
    # time a frame waited in the queue: capture->result minus the worker's own stage times
    wait = [max(0.0, r.latency_s - sum(v for k, v in r.timings.items() if "." not in k))
            for r in results.values()]
    stages: dict[str, list[float]] = {}
    for r in results.values():
        for k, v in r.timings.items():
            stages.setdefault(k, []).append(v)
    shares = [mask_share(r.mask_png) for r in results.values() if r.mask_png]
    first = min((r.capture_ts for r in results.values()), default=0.0)
    last = max((r.processed_ts for r in results.values()), default=0.0)
    span = max(last - first, 1e-9)
    return {
        "frames_sent": len(items), "results": len(results), "dead_lettered": dead_lettered,
        "defect_verdicts": sum(r.verdict is Verdict.DEFECT for r in results.values()),
        "defective_parts": n_bad, "defective_parts_found": tp, "good_parts_flagged": fp,
        "largest_mask_share": max(shares, default=0.0),  # of the frame, over the published masks
        "throughput_fps": len(results) / span, "wall_s": wall_s,
        "latency_ms": {q: percentile(lat, q) * 1000 for q in (50, 90, 99)},
        "queue_wait_ms": {q: percentile(wait, q) * 1000 for q in (50, 90)},
        "stage_ms_mean": {k: float(np.mean(v)) * 1000 for k, v in sorted(stages.items())},
        "models": next(iter(results.values())).models if results else {},
    }


def _print_summary(s: dict) -> None:
    print("\n=== lineinspect demo summary ===")
    print(f"frames sent {s['frames_sent']}, results {s['results']}, dead-lettered {s['dead_lettered']}")
    print(f"defect verdicts {s['defect_verdicts']}: {s['defective_parts_found']} of {s['defective_parts']} "
          f"defective parts found, {s['good_parts_flagged']} good parts flagged; largest published mask "
          f"{100 * s['largest_mask_share']:.1f} % of its frame")
    lat = s["latency_ms"]
    print(f"throughput {s['throughput_fps']:.2f} frames/s; latency capture->result p50 {lat[50]:.0f} ms, "
          f"p90 {lat[90]:.0f} ms, p99 {lat[99]:.0f} ms (of which waiting in the queue: p50 "
          f"{s['queue_wait_ms'][50]:.0f} ms; the conveyor runs at --fps, 0 = as fast as the camera reads)")
    print("mean stage times: " + ", ".join(f"{k} {v:.0f} ms" for k, v in s["stage_ms_mean"].items()))
    print("models: " + ", ".join(f"{k}={v}" for k, v in s["models"].items()))


def _demo_settings(settings: Settings, redis_url: str, prefix: str, conveyor: Path, fps: float) -> Settings:
    """The effective settings (the user's files and overrides included), with the demo's line on top."""
    return settings.with_overrides(**{
        "redis.url": redis_url, "redis.key_prefix": prefix, "metrics.port": 0,
        "queue.claim_idle_ms": max(settings.queue.claim_idle_ms, 60000),
        "cameras": [{"id": CAMERA, "line": LINE, "source": "folder", "path": str(conveyor), "fps": float(fps),
                     "encoding": "jpeg"}],
    })


def _learn_line(cfg: Path, tmp: Path, memory_images: int) -> int:
    """The line's normal memory from the bundled good images (the first ``memory_images``; 0 = all)."""
    print("learning the line: normal memory from the bundled train/good images ...", flush=True)
    good_dir = DEMO_DATA / "train" / "good"
    if memory_images:
        good_dir = tmp / "good"
        good_dir.mkdir()
        for src in sorted(p for p in (DEMO_DATA / "train" / "good").iterdir()
                          if p.suffix.lower() in IMAGE_EXTS)[:memory_images]:
            (good_dir / src.name).symlink_to(src.resolve())
    rc = subprocess.call([sys.executable, "-m", "stream.cli", "--config", str(cfg), "memory", "add", LINE,
                          str(good_dir)])
    if rc != 0:
        print("lineinspect demo: filling the memory failed", file=sys.stderr)
    return rc


def _start_workers(cfg: Path, args, out: Path, procs: list[subprocess.Popen], client, keys) -> bool:
    """Start ``args.workers`` workers and wait (600 s at most) until each has sent a heartbeat."""
    for i in range(args.workers):
        procs.append(_spawn(cfg, "worker", "--line", LINE, "--id", f"demo-worker-{i}", "--detector",
                            args.detector, log_path=out / f"worker-{i}.log"))
    print(f"waiting for {args.workers} worker(s) to load their models (log: {out}/worker-0.log) ...", flush=True)
    deadline = time.monotonic() + 600
    while client.hlen(keys.heartbeat) < args.workers:
        if any(p.poll() is not None for p in procs):
            print("lineinspect demo: a worker exited during start-up; see its log:", file=sys.stderr)
            print((out / "worker-0.log").read_text()[-3000:], file=sys.stderr)
            return False
        if time.monotonic() > deadline:
            print("lineinspect demo: workers did not come up within 600 s", file=sys.stderr)
            return False
        time.sleep(0.2)
    return True


def _collect(client, keys, items: list[ConveyorItem], procs: list[subprocess.Popen], ingest: subprocess.Popen,
             out: Path) -> dict[int, InspectionResult]:
    """Print each part's result and write its overlay, until every part is answered or dead-lettered (or
    nothing comes for 300 s, or the workers are gone)."""
    follower = ResultFollower(client, keys, from_start=True, want_frames=True, block_ms=500)
    results: dict[int, InspectionResult] = {}
    idle_since = time.monotonic()
    while len(results) + client.xlen(keys.dead_letter) < len(items):
        batch = follower.poll()
        for r in batch:
            if r.camera_id == CAMERA and r.seq not in results:
                results[r.seq] = r
                label = "defective part" if items[r.seq].defective else "good part"
                print(f"{format_result(r)}  [{label}: {items[r.seq].path.name.split('_', 1)[1]}]", flush=True)
                write_overlay(out / "overlays", r, follower.frames.get(r.frame_id), shape=None)
        if batch:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > 300 or all(p.poll() is not None for p in procs if p is not ingest):
            print("lineinspect demo: no progress; stopping early", file=sys.stderr)
            break
    return results


def main(settings: Settings, args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local = ensure_redis(settings.redis.url)
    print(f"Redis: {redact_url(local.url)} ({'private server started by the demo' if local.started else 'configured'})")
    prefix = f"demo{int(time.time() * 1000)}"
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="lineinspect-demo-"))
    client = None
    try:
        demo = _demo_settings(settings, local.url, prefix, tmp / "conveyor", args.fps)
        client = make_client(demo.redis, socket_timeout=demo.redis.socket_timeout_s + 5)
        items = lay_out_conveyor(DEMO_DATA / "test", tmp / "conveyor", args.frames)
        cfg = tmp / "demo.yaml"
        cfg.write_text(yaml.safe_dump(to_dict(demo), sort_keys=False))
        print(f"conveyor: {len(items)} parts ({sum(i.defective for i in items)} defective) from {DEMO_DATA}")
        if settings.detector.uses_memory and args.detector == "pipeline":
            rc = _learn_line(cfg, tmp, args.memory_images)
            if rc != 0:
                return rc
        keys = line_keys(prefix, LINE, demo.redis.key_layout)
        if not _start_workers(cfg, args, out, procs, client, keys):
            return 1
        t0 = time.monotonic()
        ingest = _spawn(cfg, "ingest", "--camera", CAMERA, log_path=out / "ingest.log")
        procs.append(ingest)
        results = _collect(client, keys, items, procs, ingest, out)
        summary = summarise(items, results, time.monotonic() - t0, client.xlen(keys.dead_letter))
        _print_summary(summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"overlays and summary.json in {out}")
        return 0 if len(results) == len(items) else 1
    finally:
        _stop(procs)
        if client is not None:
            for key in client.scan_iter(f"{prefix}:*", count=1000):
                client.delete(key)
            client.close()
        local.stop()
        shutil.rmtree(tmp, ignore_errors=True)
