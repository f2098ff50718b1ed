#!/usr/bin/env python3
"""Many-camera soak: N real RTSP cameras (deploy/rtsp_camera.py, GStreamer) -> N ``lineinspect ingest`` ->
Redis (a private single node, or a private 3-master cluster) -> one noop ``lineinspect worker`` per line.

    nice -n 10 .venv/bin/python deploy/soak.py --redis single --cameras 4 --fps 10 --seconds 120
    nice -n 10 .venv/bin/python deploy/soak.py --redis cluster --cameras 4 --fps 10 --seconds 120

One camera per line (line0..N-1; on the cluster ``redis.key_layout: line_tag`` spreads them over the masters).
Prints: every frame accounted for (captured = results + dead + dropped{reason} + queued, per line), Redis
memory (used_memory summed over the nodes) at start, every 30 s and at the end, result latency p50/p99
(capture -> published, from the results), CPU seconds per camera of the ingest process and per 1000 frames of
the noop worker (/proc/PID/stat), and bytes/s in+out of Redis (INFO stats). ``--json FILE`` writes the same.
Nothing of yours is touched: private Redis on free ports, cameras on free ports, all stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.chaos_procs import PrivateRedis, Procs, free_port, ingest_stats  # noqa: E402
from stream.keys import line_keys  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
RESULTS_MAXLEN = 1000  # queue.results_maxlen of the run
WARM_S = 10.0  # ingest CPU is measured from this many seconds after start to the end (steady state)


def cpu_s(pid: int) -> float:
    """utime + stime of a living process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class Nodes:
    """INFO of every Redis node of the run (1 or the masters of the cluster)."""

    def __init__(self, ports):
        import redis

        self.clients = [redis.Redis(port=p, socket_timeout=5) for p in ports]

    def used_memory(self) -> int:
        return sum(int(c.info("memory")["used_memory"]) for c in self.clients)

    def cpu_s(self) -> float:
        """used_cpu_user + used_cpu_sys of the redis-server processes (INFO cpu), summed."""
        return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in (c.info("cpu") for c in self.clients))

    def net_bytes(self) -> int:
        return sum(int(i["total_net_input_bytes"]) + int(i["total_net_output_bytes"])
                   for i in (c.info("stats") for c in self.clients))


def start_cameras(n, workdir, width, height, fps):
    cams = []
    for i in range(n):
        port = free_port()
        log = open(workdir / f"rtsp{i}.log", "wb")  # noqa: SIM115 (kept open for the run)
        proc = subprocess.Popen(["/usr/bin/python3", str(ROOT / "deploy" / "rtsp_camera.py"), "--port", str(port),
                                 "--width", str(width), "--height", str(height), "--fps", str(fps),
                                 "--pattern", "smpte" if i % 2 else "ball"], stdout=log, stderr=subprocess.STDOUT)
        cams.append((proc, port, workdir / f"rtsp{i}.log"))
    deadline = time.monotonic() + 30
    for proc, _port, log in cams:
        while "READY" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rtsp camera did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
    return cams


class ResultTail(threading.Thread):
    """Reads every line's results stream as it grows (the stream itself is trimmed at results_maxlen)."""

    def __init__(self, rs, lines, layout):
        super().__init__(daemon=True)
        self.rs, self.layout = rs, layout
        self.keys = {line: line_keys("soak", line, layout).results for line in lines}
        self.ids: dict[str, list[str]] = {line: [] for line in lines}
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from stream.entries import PAYLOAD_FIELD
        from stream.redisclient import make_client
        from stream.wire import decode_result

        client = make_client(self.rs, socket_timeout=5)
        last = {line: "0-0" for line in self.keys}
        while True:
            got = 0
            for line, key in self.keys.items():
                for _s, entries in client.xread({key: last[line]}, count=2000) or ():
                    for eid, fields in entries:
                        last[line] = eid
                        r = decode_result(fields[PAYLOAD_FIELD])
                        self.ids[line].append(r.frame_id)
                        self.latencies.append(r.latency_s)
                        got += 1
            if not got:
                if self.stop.is_set():
                    break
                time.sleep(0.1)
        client.close()


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args) -> dict:
    from config.settings import RedisSettings
    from stream.redisclient import make_client

    workdir = Path(tempfile.mkdtemp(prefix="li-soak-"))
    cluster = single = None
    cams = []
    procs = None
    try:
        if args.redis == "cluster":
            from stream.localcluster import LocalCluster

            cluster = LocalCluster(3, workdir=workdir).start()
            url, layout, ports = cluster.url, "line_tag", cluster.ports
        else:
            single = PrivateRedis(workdir)
            single.start()
            url, layout, ports = single.url, "plain", [single.port]
        nodes = Nodes(ports)
        cams = start_cameras(args.cameras, workdir, args.width, args.height, args.fps)
        lines = [f"line{i}" for i in range(args.cameras)]
        config = {"redis": {"url": url, "key_prefix": "soak", "key_layout": layout},
                  "metrics": {"enabled": False}, "log_level": "WARNING",
                  # results kept: results_maxlen per line; done keys: done_ttl_s = (5 + 1) * 4 + 10 = 34 s here
                  # (defaults: 10000 and 300 s), so that memory reaches its plateau within the run
                  "queue": {"maxlen": 2000, "results_maxlen": RESULTS_MAXLEN, "result_ttl_s": 30,
                            "claim_idle_ms": 5000, "claim_interval_s": 1.0, "job_timeout_s": 10},
                  # the review window (frames kept for operator review) per line: 8 MiB instead of 64, so that it
                  # too is full within the run (at 25 fps of 640x360 JPEG: after about 15 s)
                  "review": {"keep_bytes": 8 << 20},
                  "cameras": [{"id": f"cam{i}", "line": lines[i], "source": "url",
                               "path": f"rtsp://127.0.0.1:{port}/stream", "fps": args.fps, "encoding": "jpeg",
                               "jpeg_quality": args.quality, "reconnect_initial_s": 0.2, "reconnect_max_s": 2.0}
                              for i, (_p, port, _l) in enumerate(cams)]}
        procs = Procs(workdir, config)
        workers = [procs.spawn("worker", "--line", line, "--id", f"w-{line}", "--detector", "noop")
                   for line in lines]
        time.sleep(3)
        rs = RedisSettings(url=url, key_prefix="soak", key_layout=layout)
        tail = ResultTail(rs, lines, layout)
        tail.start()
        mem = [("start", 0, nodes.used_memory())]
        net0, redis_cpu0, t0 = nodes.net_bytes(), nodes.cpu_s(), time.monotonic()
        worker_cpu0 = [cpu_s(p.pid) for p in workers]
        ingests = [procs.spawn("ingest", "--camera", f"cam{i}") for i in range(args.cameras)]
        next_sample, warm = t0 + 30, None
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1)
            if warm is None and time.monotonic() - t0 >= WARM_S:  # steady state: start-up (imports) excluded
                warm = (time.monotonic(), [cpu_s(p.pid) for p in ingests])
            if time.monotonic() >= next_sample:
                mem.append(("t", round(time.monotonic() - t0), nodes.used_memory()))
                next_sample += 30
        ingest_cpu = [cpu_s(p.pid) - c0 for p, c0 in zip(ingests, warm[1], strict=True)]
        ingest_window = time.monotonic() - warm[0]
        for p in ingests:
            p.send_signal(signal.SIGTERM)
        for p in ingests:
            p.wait(30)
        seconds = time.monotonic() - t0
        mem.append(("end (ingest stopped)", round(seconds), nodes.used_memory()))
        client = make_client(rs)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(client.xlen(line_keys("soak", ln, layout).frames)
                                                  for ln in lines):
            time.sleep(0.5)
        net, redis_cpu = nodes.net_bytes() - net0, nodes.cpu_s() - redis_cpu0
        wall = time.monotonic() - t0
        worker_cpu = [cpu_s(p.pid) - c0 for p, c0 in zip(workers, worker_cpu0, strict=True)]
        for p in workers:
            procs.stop(p)
        mem.append(("drained", round(time.monotonic() - t0), nodes.used_memory()))
        tail.stop.set()
        tail.join(30)
        rows, latencies = [], tail.latencies
        for i, line in enumerate(lines):
            k = line_keys("soak", line, layout)
            s = ingest_stats(procs.output(ingests[i]))
            dropped = {key[8:]: v for key, v in s.items() if key.startswith("dropped_") and v}
            ids = set(tail.ids[line])
            dead, queued = client.xlen(k.dead_letter), client.xlen(k.frames)
            rows.append({"line": line, "captured": s.get("captured", 0), "results": len(ids),
                         "dup": len(tail.ids[line]) - len(ids), "dead": dead, "dropped": dropped, "queued": queued,
                         "missed": s.get("missed", 0), "reconnects": s.get("reconnects", 0),
                         "uncounted": s.get("captured", 0) - len(ids) - dead - sum(dropped.values()) - queued})
        frames = sum(r["results"] for r in rows)
        report = {
            "redis": args.redis, "cameras": args.cameras, "size": f"{args.width}x{args.height}", "fps": args.fps,
            "jpeg_quality": args.quality, "seconds": round(seconds, 1), "lines": rows,
            "frames_captured": sum(r["captured"] for r in rows), "frames_results": frames,
            "uncounted": sum(r["uncounted"] for r in rows),
            "redis_used_memory": mem,
            "latency_p50_ms": round(1000 * pct(latencies, 0.5), 1),
            "latency_p99_ms": round(1000 * pct(latencies, 0.99), 1),
            "ingest_cpu_s_per_camera": round(sum(ingest_cpu) / len(ingest_cpu), 2),
            "ingest_cpu_fraction_per_camera": round(sum(ingest_cpu) / len(ingest_cpu) / ingest_window, 3),
            "ingest_cpu_window_s": round(ingest_window, 1),
            "worker_cpu_s_per_1000_frames": round(1000 * sum(worker_cpu) / max(1, frames), 2),
            "redis_bytes_per_s": round(net / wall),
            "redis_cpu_s_per_1000_frames": round(1000 * redis_cpu / max(1, frames), 3),
            "redis_cpu_fraction": round(redis_cpu / wall, 3),
            "crashes": procs.crashes(),
        }
        client.close()
        return report
    finally:
        if procs is not None:
            procs.cleanup()
        for proc, _port, _log in cams:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", choices=["single", "cluster"], default="single")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--quality", type=int, default=90, help="camera.jpeg_quality")
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--json", default="")
    args = p.parse_args()
    r = run(args)
    print(f"soak: {r['cameras']} RTSP cameras {r['size']} at {r['fps']} fps, {r['seconds']} s, Redis {r['redis']}")
    for row in r["lines"]:
        print(f"  {row['line']}: captured {row['captured']} = results {row['results']} + dead {row['dead']} + "
              f"dropped {row['dropped']} + queued {row['queued']} (uncounted {row['uncounted']}, dup {row['dup']}, "
              f"missed slots {row['missed']}, reconnects {row['reconnects']})")
    print("  redis used_memory: " + ", ".join(f"{n} {t}s {b / 1e6:.1f} MB" for n, t, b in r["redis_used_memory"]))
    print(f"  latency capture->result p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms")
    print(f"  ingest CPU per camera: {r['ingest_cpu_s_per_camera']} s in {r['ingest_cpu_window_s']} s steady "
          f"state ({r['ingest_cpu_fraction_per_camera']:.3f} of a core); noop worker CPU per 1000 frames: {r['worker_cpu_s_per_1000_frames']} s")
    print(f"  bytes through Redis (in+out, all nodes): {r['redis_bytes_per_s'] / 1e6:.2f} MB/s; Redis CPU "
          f"{r['redis_cpu_fraction']:.3f} of a core ({r['redis_cpu_s_per_1000_frames']} s per 1000 frames, all "
          f"nodes); crashes {r['crashes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["uncounted"] == 0 and r["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
