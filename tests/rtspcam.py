"""A real RTSP camera for tests: deploy/rtsp_camera.py (GStreamer's RTSP server, system python3 + gi) on a
free port, started, stopped, restarted, stalled (SIGUSR1) and resumed (SIGUSR2)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT, free_port

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = ROOT / "deploy" / "rtsp_camera.py"
_CHECK = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
          "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
          "missing = [e for e in ('videotestsrc', 'x264enc', 'rtph264pay', 'valve') "
          "if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))")


def gstreamer_missing() -> str:
    """Why the RTSP camera cannot run here ("" when it can)."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    proc = subprocess.run([SYSTEM_PYTHON, "-c", _CHECK], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return ("GStreamer RTSP server not installed (bash deploy/dev.sh test installs python3-gi "
                "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,ugly}): "
                + proc.stderr.strip().splitlines()[-1])
    if proc.stdout.strip():
        return f"GStreamer elements missing: {proc.stdout.strip()} (gstreamer1.0-plugins-base/good/ugly)"
    return ""


class RtspCamera:
    def __init__(self, workdir: Path, *, width: int = 640, height: int = 360, fps: int = 25, user: str = "",
                 password: str = "", port: int | None = None):
        self.workdir, self.port = Path(workdir), port or free_port()
        self.args = ["--width", str(width), "--height", str(height), "--fps", str(fps)]
        if user:
            self.args += ["--user", user, "--password", password]
        self.user, self.password = user, password
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def url(self, password: str | None = None) -> str:
        cred = f"{self.user}:{self.password if password is None else password}@" if self.user else ""
        return f"rtsp://{cred}127.0.0.1:{self.port}/stream"

    def start(self, timeout: float = 20) -> None:
        log = self.workdir / f"rtsp-{self.port}-{self.starts}.log"
        self.starts += 1
        self.log_path = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SCRIPT), "--port", str(self.port), *self.args],
                                         stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "READY" in log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"rtsp camera exited: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        raise RuntimeError("rtsp camera did not get ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def stall(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR2)
