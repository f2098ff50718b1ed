"""Headless Chromium for the browser tests, driven over the Chrome DevTools protocol (aiohttp's websocket):
the browser binary (Debian's ``chromium``, installed by ``deploy/dev.sh test``; the tests skip without it), its
launch, and a minimal protocol client."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
                  "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows")


class Cdp:
    """A minimal Chrome DevTools protocol client over aiohttp's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        self.next_id += 1
        mid = self.next_id
        await self.ws.send_json({"id": mid, "method": method, "params": params or {}})
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), max(0.1, deadline - time.monotonic()))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg["result"]

    async def wait_loaded(self, url_prefix: str, timeout: float = 60.0) -> None:
        """Until the page at ``url_prefix`` has loaded (a navigation replaces the JS context meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                href, ready = await self.js("[location.href, document.readyState]", timeout=10)
                if href.startswith(url_prefix) and ready == "complete":
                    return
            except RuntimeError as exc:  # "Execution context was destroyed": navigation under way
                if time.monotonic() > deadline:
                    raise
                del exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"page {url_prefix} did not load")
            await asyncio.sleep(0.1)

    async def js(self, expression: str, timeout: float = 60.0):
        res = await self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS failed: {res['exceptionDetails']}")
        return res["result"].get("value")


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary: apt-get install -y chromium")


def wait_devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        if marker.is_file():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.1)
    raise RuntimeError("chromium did not open its DevTools port")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def launch_chromium(profile: Path, log, window: str = "1000,800") -> tuple[subprocess.Popen, int]:
    """Headless Chromium with its own profile; (process, DevTools port)."""
    proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", f"--window-size={window}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        return proc, wait_devtools_port(profile, proc)
    except Exception:
        stop_process(proc)
        raise
