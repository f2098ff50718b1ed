"""A throw-away local Redis Cluster (tests, ``lineinspect bench --soak``): N masters, no replicas, on free ports
of 127.0.0.1 (never 6379), each ``redis-server --cluster-enabled yes`` in its own directory, joined with
``redis-cli --cluster create``. A master can be restarted (same ``nodes.conf``: same node id and slots; no
AOF: its data are gone, as after a crash). ``cluster-require-full-coverage no``: while one master is down the
lines of the others go on."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(port: int, timeout: float | None = None):
    """A plain client of one node (for set-up and slot queries, not a cluster client)."""
    from stream.redisclient import connect

    return connect(f"redis://127.0.0.1:{port}/0", socket_timeout=timeout)


class LocalCluster:
    def __init__(self, masters: int = 3, workdir: Path | None = None, node_timeout_ms: int = 2000):
        self.server = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if self.server is None or self.cli is None:
            raise RuntimeError("redis-server / redis-cli not on PATH (apt-get install redis-server redis-tools)")
        self.dir = Path(tempfile.mkdtemp(prefix="li-cluster-", dir=workdir))
        ports: set[int] = set()
        while len(ports) < 2 * masters:  # client port and cluster bus port of each node
            p = _free_port()
            if p != 6379:
                ports.add(p)
        ports_list = sorted(ports)
        self.ports = ports_list[:masters]
        self.bus_ports = ports_list[masters:]
        self.node_timeout_ms = node_timeout_ms
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The url of settings ``redis.url``: any node; the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _start_node(self, i: int) -> None:
        port = self.ports[i]
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus_ports[i]), "--cluster-config-file", str(d / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no",
             "--save", "", "--appendonly", "no", "--dir", str(d)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ping(port)

    def _wait_ping(self, port: int, timeout: float = 20) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _node(port, 0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"cluster node on port {port} did not start")

    def start(self) -> LocalCluster:
        for i in range(len(self.ports)):
            self._start_node(i)
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok and knows every slot."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                infos = [_node(p, 1).cluster("info") for p in self.ports]
                if all(i.get("cluster_state") == "ok" and int(i.get("cluster_slots_ok", 0)) == 16384
                       for i in infos):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("local cluster did not reach cluster_state:ok")

    def port_of_slot(self, slot: int) -> int:
        for start, end, master, *_ in _node(self.ports[0]).execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise KeyError(slot)

    def stop_node(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def restart_node(self, port: int, down_s: float = 0.0) -> float:
        """SIGTERM one master, wait ``down_s``, start it again; returns the monotonic time it answered."""
        self.stop_node(port)
        time.sleep(down_s)
        self._start_node(self.ports.index(port))
        t = time.monotonic()
        self.wait_ok()
        return t

    def stop(self) -> None:
        for port in list(self.procs):
            self.stop_node(port)
        shutil.rmtree(self.dir, ignore_errors=True)
