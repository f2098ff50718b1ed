"""``lineinspect bench``: throughput figures next to their limits. Prints numbers, asserts nothing.

(a) raw redis-py rate of XADD + XREADGROUP + XACK with payloads the size of a 1080p JPEG (a limit);
(b) OpenCV JPEG decode rate of that frame (a limit: every worker decodes every frame);
(c) frames/s through real separate processes ``ingest -> Redis -> worker (noop) -> result`` at 1080p JPEG,
    as a ratio to min(a, b);
(d) with ``--detector pipeline``: the bare SAM encoder's in-process rate on the same frames (the limit: every
    frame is encoded once), the bare detector's in-process rate (``workers.pipeline.build_detector``, imported
    only in that mode, so that ``stream`` never imports torch at import time), then the worker's frames/s
    through the same processes draining a backlog, with ``worker.overlap`` off and on (``--repeat`` times,
    alternating), each as a ratio to the bare encoder and to the bare detector, and overlap on / off.

Every Redis key it writes lives under a fresh ``libench<hex>`` prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from config.settings import Settings, to_dict
from stream.entries import payload_of
from stream.keys import line_keys
from stream.producer import add_entry
from stream.redact import redact_url

DEMO_IMAGE = Path(__file__).with_name("demo_data") / "hazelnut_toy" / "test" / "good" / "04.jpg"
BENCH_LINE = "benchline"
BENCH_CAMERA = "benchcam"


def _cv2():
    import cv2

    return cv2


def bench_image(width: int, height: int, variant: int = 0) -> np.ndarray:
    """A natural-looking BGR frame of the requested size (the bundled demo image, resized and shifted).

    A real photo compresses like a camera frame; noise would give an unrealistically large JPEG."""
    cv2 = _cv2()
    base = cv2.imread(str(DEMO_IMAGE), cv2.IMREAD_COLOR)
    if base is None:  # pragma: no cover - the demo data ships with the package
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.dstack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)]).astype(np.uint8)
    img = cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)
    if variant:
        img = np.roll(img, shift=variant * 37, axis=1)
    return img


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    cv2 = _cv2()
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------------ (a), (b)


def redis_rate(client, prefix: str, payload: bytes, n: int) -> float:
    """Sequential XADD, then XREADGROUP(count=1) + XACK per entry: messages/s through redis-py."""
    key = f"{prefix}:rawbench"
    client.xgroup_create(key, "g", id="0", mkstream=True)
    t0 = time.perf_counter()
    for _ in range(n):
        add_entry(client, key, payload)
    for _ in range(n):
        reply = client.xreadgroup("g", "c", {key: ">"}, count=1)
        entry_id = reply[0][1][0][0]
        client.xack(key, "g", entry_id)
    elapsed = time.perf_counter() - t0
    client.delete(key)
    return _rate(n, elapsed)


def decode_rate(jpeg: bytes, n: int) -> float:
    cv2 = _cv2()
    buf = np.frombuffer(jpeg, np.uint8)
    cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return _rate(n, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ (c), (d)


class _Run:
    """Settings file, frame folder and subprocesses of one process benchmark."""

    def __init__(self, settings: Settings, prefix: str, tmp: Path, frames: int, width: int, height: int,
                 quality: int):
        self.tmp = tmp
        self.prefix = prefix
        folder = tmp / "frames"
        folder.mkdir()
        variants = [bench_image(width, height, v) for v in range(8)]
        cv2 = _cv2()
        for i in range(frames):  # stored as JPEG (what a camera folder holds); ingest re-encodes
            cv2.imwrite(str(folder / f"{i:05d}.jpg"), variants[i % len(variants)],
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
        data = to_dict(settings)
        data["redis"]["key_prefix"] = prefix
        data["metrics"]["enabled"] = False
        data["queue"].update(maxlen=frames + 100, block_ms=200, claim_interval_s=1.0)
        data["cameras"] = [{"id": BENCH_CAMERA, "line": BENCH_LINE, "source": "folder", "path": str(folder),
                            "loop": False, "fps": 0.0, "encoding": "jpeg", "jpeg_quality": quality}]
        self.config = tmp / "bench.yaml"
        import yaml

        self.config.write_text(yaml.safe_dump(data))
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(self.config), *args],
                             stdout=log, stderr=subprocess.STDOUT)
        p.log_path = log.name
        self.procs.append(p)
        return p

    def tail(self, p: subprocess.Popen, n: int = 15) -> str:
        return "\n".join(Path(p.log_path).read_text(errors="replace").splitlines()[-n:])

    def stop_all(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def pipeline_rate(settings: Settings, client, prefix: str, *, frames: int, width: int, height: int,
                  quality: int, detector: str, workers: int, ready_timeout_s: float,
                  run_timeout_s: float, prefill: bool = False) -> dict:
    """Frames/s through real processes: ``workers`` worker processes and one ingest process.

    ``prefill=False``: workers first, then ingest (live; the slower side sets the rate).
    ``prefill=True``: ingest fills the stream first, then the workers drain it (the worker side's rate).
    The rate is taken from the first to the last published result."""
    from stream.wire import decode_result

    keys = line_keys(prefix, BENCH_LINE, settings.redis.key_layout)
    with tempfile.TemporaryDirectory(prefix="li-bench-") as tmpdir:
        run = _Run(settings, prefix, Path(tmpdir), frames, width, height, quality)
        try:
            t_start = time.time()
            if prefill:  # the stream holds every frame before the workers start: they are never starved
                ingest = run.start("ingest", "--camera", BENCH_CAMERA)
                if ingest.wait(run_timeout_s) != 0:
                    raise RuntimeError("ingest failed:\n" + run.tail(ingest))
            ws = [run.start("worker", "--line", BENCH_LINE, "--id", f"bench-w{i}", "--detector", detector)
                  for i in range(workers)]
            deadline = time.monotonic() + ready_timeout_s
            while time.monotonic() < deadline and client.hlen(keys.heartbeat) < workers:
                if any(w.poll() is not None for w in ws):
                    raise RuntimeError("a worker exited during start-up:\n" + run.tail(ws[0]))
                time.sleep(0.1)
            if client.hlen(keys.heartbeat) < workers:
                raise RuntimeError(f"workers not ready after {ready_timeout_s:.0f}s:\n" + run.tail(ws[0]))
            if not prefill:
                t_start = time.time()
                ingest = run.start("ingest", "--camera", BENCH_CAMERA)
            deadline = time.monotonic() + run_timeout_s
            while time.monotonic() < deadline and client.xlen(keys.results) < frames:
                if any(w.poll() is not None for w in ws):
                    raise RuntimeError("a worker died:\n" + run.tail(ws[0]))
                time.sleep(0.1)
            ingest.wait(30)
            ingest_out = run.tail(ingest, 3)
        finally:
            run.stop_all()
    results = [decode_result(payload_of(f)) for _, f in client.xrange(keys.results)]
    if len(results) < 2:
        raise RuntimeError(f"only {len(results)} results within {run_timeout_s:.0f}s")
    done = sorted(r.processed_ts for r in results)
    captured = sorted(r.capture_ts for r in results)
    latency = [r.latency_s for r in results]
    return {
        "results": len(results),
        "rate": _rate(len(results) - 1, done[-1] - done[0]),  # steady state: first to last result
        "ingest_rate": _rate(len(results) - 1, captured[-1] - captured[0]),
        "wall_s": done[-1] - t_start,
        "latency_p50": statistics.median(latency),
        "latency_max": max(latency),
        "ingest": ingest_out.strip().splitlines()[-1] if ingest_out.strip() else "",
    }


def bare_detector_rate(settings: Settings, client, prefix: str, width: int, height: int, n: int) -> dict:
    """The real detector in this process (imported here only: it brings torch/onnxruntime)."""
    from workers.pipeline import build_detector

    s = settings.with_overrides(**{"redis.key_prefix": prefix})
    t0 = time.perf_counter()
    det = build_detector(s, BENCH_LINE + "bare", client)
    load_s = time.perf_counter() - t0
    images = [bench_image(width, height, v) for v in range(n + 1)]
    det.inspect(images[0], "warmup")
    t0 = time.perf_counter()
    for i, img in enumerate(images[1:]):
        det.inspect(img, f"bare:{i}")  # distinct keys: no embedding-cache hits
    return {"rate": _rate(n, time.perf_counter() - t0), "load_s": load_s, "models": dict(det.models)}


def bare_encoder_rate(settings: Settings, width: int, height: int, n: int) -> dict:
    """The SAM encoder alone in this process (``settings.sam`` with the taps the memory map needs), on ``n``
    distinct frames after one warm-up call: the limit of a worker's frame rate."""
    from workers.sam import build_sam_backend

    sam = build_sam_backend(settings.sam, taps=settings.sam_taps)
    images = [bench_image(width, height, v) for v in range(n + 1)]
    sam.embed(images[0], "warmup")
    t0 = time.perf_counter()
    for i, img in enumerate(images[1:]):
        sam.embed(img, f"encoder:{i}")
    providers = getattr(sam, "active_providers", ()) or (getattr(sam, "device", "?"),)
    return {"rate": _rate(n, time.perf_counter() - t0), "name": sam.name, "providers": list(providers)}


def _load() -> str:
    try:
        return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "load ?"


def detector_figures(settings: Settings, client, prefix: str, *, n: int, width: int, height: int, quality: int,
                     repeat: int = 1) -> dict:
    """(d): the bare encoder, the bare detector, then the worker with ``worker.overlap`` off and on (alternating,
    ``repeat`` times each, a fresh line memory each run) draining a backlog of ``n`` frames; printed as it goes."""
    enc = bare_encoder_rate(settings, width, height, n)
    print(f"(d) bare SAM encoder in-process ({enc['name']} on {', '.join(enc['providers'])}, taps "
          f"{list(settings.sam_taps) or 'none'}): {enc['rate']:.3f} frames/s ({1 / enc['rate']:.2f} s/frame; "
          f"{_load()})", flush=True)
    bare = bare_detector_rate(settings, client, prefix, width, height, n)
    print(f"(d) bare detector in-process ({bare['models']}, load {bare['load_s']:.1f}s): {bare['rate']:.3f} "
          f"frames/s = {bare['rate'] / enc['rate']:.2f} x the bare encoder ({_load()})", flush=True)
    _cleanup(client, prefix)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(max(1, repeat)):
        for overlap in (False, True):
            s = settings.with_overrides(**{"worker.overlap": overlap})
            d = pipeline_rate(s, client, prefix, frames=n, width=width, height=height, quality=quality,
                              detector="pipeline", workers=1, ready_timeout_s=300, run_timeout_s=900, prefill=True)
            _cleanup(client, prefix)  # the next run starts from an empty line memory too
            rates[overlap].append(d["rate"])
            print(f"(d) backlog -> worker(pipeline, overlap {'on ' if overlap else 'off'}) -> result: "
                  f"{d['rate']:.3f} frames/s = {d['rate'] / enc['rate']:.2f} x the bare encoder, "
                  f"{d['rate'] / bare['rate']:.2f} x the bare detector; {d['results']}/{n} results, latency p50 "
                  f"{d['latency_p50']:.1f} s ({_load()})", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"(d) worker frames/s x encoder s/frame: overlap off {off / enc['rate']:.2f}, on {on / enc['rate']:.2f}; "
          f"overlap on / off = {on / off:.2f} (medians of {len(rates[True])})", flush=True)
    return {"encoder": enc["rate"], "detector": bare["rate"], "overlap_off": off, "overlap_on": on}


# ------------------------------------------------------------------------------------------ CLI


def _cleanup(client, prefix: str) -> None:
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def prompt_modes(args: argparse.Namespace) -> int:
    """Per-frame time of the CLIP map with the fixed prompt ensemble and with ViP2 prompts (same backbone)."""
    from workers.bench.clip_maps import bench_prompt_modes  # torch: only in this mode

    res = bench_prompt_modes(model=args.clip_model, image_size=args.clip_size, n_frames=max(2, args.frames),
                             pretrained=args.clip_pretrained)
    print(f"CLIP prompt modes, {res['model']} ({res['pretrained']} weights) at {res['image_size']} px, "
          f"{res['n_frames']} frames of {res['frame_size'][1]}x{res['frame_size'][0]}, "
          f"torch threads {res['torch_threads']}:")
    for mode in ("ensemble", "vip2"):
        print(f"  {mode:<8} {res[f'{mode}_ms_per_frame']:9.1f} ms/frame (min {res[f'{mode}_ms_min']:.1f})  "
              "stages: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res[f"{mode}_stages_ms"].items()))
    print(f"  vip2 / ensemble = {res['vip2_over_ensemble']:.2f}")
    return 0


def main(settings: Settings, args: argparse.Namespace) -> int:

    if getattr(args, "prompt_modes", False):
        return prompt_modes(args)
    if getattr(args, "chaos", False):
        from stream.chaos import main as chaos_main

        return chaos_main(args)
    frames = int(getattr(args, "frames", 200))
    width, height = int(getattr(args, "width", 1920)), int(getattr(args, "height", 1080))
    detector = getattr(args, "detector", "noop")
    quality = settings.cameras[0].jpeg_quality if settings.cameras else 90
    from stream.redisclient import make_client

    client = make_client(settings.redis, socket_timeout=30)
    client.ping()
    prefix = f"libench{uuid.uuid4().hex[:8]}"
    jpeg = _encode_jpeg(bench_image(width, height), quality)
    print(f"lineinspect bench: {width}x{height} JPEG q{quality} = {len(jpeg) / 1024:.0f} KiB, "
          f"redis {redact_url(settings.redis.url)}, {frames} frames", flush=True)
    try:
        # limits: best of 3 (other processes share this machine; a limit is what is possible)
        a = max(redis_rate(client, prefix, jpeg, frames) for _ in range(3))
        print(f"(a) redis-py XADD+XREADGROUP+XACK, {len(jpeg) / 1024:.0f} KiB payloads: {a:8.1f} msg/s "
              f"({a * len(jpeg) / 2**20:.0f} MiB/s)", flush=True)
        b = max(decode_rate(jpeg, max(20, frames // 2)) for _ in range(3))
        print(f"(b) cv2.imdecode {width}x{height} JPEG:                 {b:8.1f} frames/s", flush=True)
        limit = min(a, b)
        for prefill in (False, True):
            c = pipeline_rate(settings, client, prefix, frames=frames, width=width, height=height,
                              quality=quality, detector="noop", workers=1, ready_timeout_s=60,
                              run_timeout_s=120, prefill=prefill)
            label = "backlog: ingest first, then the worker drains" if prefill else "live: worker + ingest"
            print(f"(c) ingest -> Redis -> worker(noop) -> result, separate processes, {label}: "
                  f"{c['rate']:.1f} frames/s = {c['rate'] / limit:.2f} x min(a, b) = {limit:.1f}; "
                  f"{c['results']}/{frames} results; ingest captured at {c['ingest_rate']:.1f} frames/s; "
                  f"latency p50 {c['latency_p50'] * 1000:.0f} ms, max {c['latency_max'] * 1000:.0f} ms",
                  flush=True)
            _cleanup(client, prefix)
        _cleanup(client, prefix)
        if detector == "pipeline":
            n = max(3, min(frames, int(getattr(args, "detector_frames", 10))))
            detector_figures(settings, client, prefix, n=n, width=width, height=height, quality=quality,
                             repeat=int(getattr(args, "repeat", 1)))
        elif detector != "noop":
            print(f"--detector {detector!r}: only noop and pipeline are benchmarked", file=sys.stderr)
            return 2
    finally:
        _cleanup(client, prefix)
    return 0
