"""Camera sources behind one small interface: ``open()``, ``read() -> BGR uint8 ndarray``, ``close()``.

- :class:`FolderSource`: image files of a folder in sorted order (optional loop). A file that does not
  decode is counted in ``unreadable`` and skipped, never a crash.
- :class:`VideoSource`: a video file (optional loop).
- :class:`UrlSource`: an RTSP/HTTP(S) stream through OpenCV's FFmpeg backend.
- :class:`UsbSource`: a local capture device by index.

Errors: a source that cannot be opened, stops giving frames or vanishes raises
:class:`~stream.contracts.SourceConnectionError`; a finite source at its end raises
:class:`~stream.contracts.SourceExhausted`.

:class:`ReconnectingSource` wraps any source: on ``SourceConnectionError`` it reopens with exponential backoff
(``camera.reconnect_initial_s`` doubling up to ``camera.reconnect_max_s``; at most ``camera.max_reconnects``
attempts in a row, -1 = forever) and counts the attempts. Its clock and sleep are injectable for tests.

Nothing here touches Redis; OpenCV is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from config.settings import CameraSettings
from stream.backoff import Backoff
from stream.contracts import SourceConnectionError, SourceExhausted
from stream.redact import redact_url

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
URL_OPEN_TIMEOUT_MS = 5000
URL_READ_TIMEOUT_MS = 5000


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ImportError("OpenCV is needed for camera sources: pip install opencv-python-headless") from exc
    return cv2


@runtime_checkable
class FrameSource(Protocol):
    """A camera. ``read`` returns the next BGR (or grey) uint8 frame."""

    name: str  # for logs: "folder:/path", "url:rtsp://..."

    def open(self) -> None: ...

    def read(self) -> np.ndarray: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------ folder


class FolderSource:
    """Images of one folder, sorted by name. ``unreadable`` counts files that did not decode."""

    def __init__(self, path: str | Path, loop: bool = False):
        self.path = Path(path)
        self.loop = loop
        self.name = f"folder:{self.path}"
        self.unreadable = 0
        self._files: list[Path] = []
        self._index = 0
        self._open = False

    def _list(self) -> list[Path]:
        if not self.path.is_dir():
            raise SourceConnectionError(f"{self.name}: not a folder (missing or removed)")
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SourceConnectionError(f"{self.name}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def open(self) -> None:
        self._files = self._list()
        self._index = 0
        self._open = True

    def read(self) -> np.ndarray:
        if not self._open:
            raise SourceConnectionError(f"{self.name}: not open")
        cv2 = _cv2()
        misses = 0  # unreadable files in a row during this call
        while True:
            if self._index >= len(self._files):
                if not self.loop:
                    raise SourceExhausted(f"{self.name}: all {len(self._files)} files read")
                self._files = self._list()  # every pass picks up added and removed files
                self._index = 0
            if misses >= len(self._files):
                raise SourceConnectionError(f"{self.name}: none of {len(self._files)} files decodes")
            path = self._files[self._index]
            self._index += 1
            if not path.is_file():
                raise SourceConnectionError(f"{self.name}: {path.name} vanished")
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self.unreadable += 1
                misses += 1
                log.warning("%s: %s does not decode, skipped", self.name, path.name)
                continue
            return image

    def close(self) -> None:
        self._open = False
        self._files = []


# ------------------------------------------------------------------------------------------ OpenCV captures


class _CaptureSource:
    """Common part of the VideoCapture-based sources."""

    name = "capture"

    def __init__(self) -> None:
        self._cap = None
        self.unreadable = 0

    def _make_capture(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def open(self) -> None:
        self.close()
        cap = self._make_capture()
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise SourceConnectionError(f"{self.name}: cannot open")
        self._cap = cap

    def _grab(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceConnectionError(f"{self.name}: not open")
        ok, frame = self._cap.read()
        return frame if ok and frame is not None and frame.size else None

    def read(self) -> np.ndarray:
        frame = self._grab()
        if frame is None:
            raise SourceConnectionError(f"{self.name}: read failed (stream ended or device vanished)")
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class VideoSource(_CaptureSource):
    """A video file. At its end: rewind when ``loop``, else :class:`SourceExhausted`."""

    def __init__(self, path: str | Path, loop: bool = False):
        super().__init__()
        self.path = Path(path)
        self.loop = loop
        self.name = f"video:{self.path}"

    def _make_capture(self):
        if not self.path.is_file():
            raise SourceConnectionError(f"{self.name}: file not found")
        cv2 = _cv2()
        return cv2.VideoCapture(str(self.path))

    def read(self) -> np.ndarray:
        frame = self._grab()
        if frame is not None:
            return frame
        if not self.path.is_file():
            raise SourceConnectionError(f"{self.name}: file vanished")
        if not self.loop:
            raise SourceExhausted(f"{self.name}: end of file")
        # rewind by reopening (seeking is unreliable for some containers)
        self.open()
        frame = self._grab()
        if frame is None:
            raise SourceConnectionError(f"{self.name}: no frame after rewinding")
        return frame


class UrlSource(_CaptureSource):
    """An RTSP/HTTP stream. It never ends: a failed read is a connection error (reconnect)."""

    def __init__(self, url: str, open_timeout_ms: int = URL_OPEN_TIMEOUT_MS,
                 read_timeout_ms: int = URL_READ_TIMEOUT_MS):
        super().__init__()
        self.url = url
        self.open_timeout_ms = open_timeout_ms
        self.read_timeout_ms = read_timeout_ms
        self.name = f"url:{redact_url(url)}"

    def _make_capture(self):
        cv2 = _cv2()
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms,
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.read_timeout_ms]
        return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)


class UsbSource(_CaptureSource):
    """A local capture device (``/dev/video<index>``)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.name = f"usb:{index}"

    def _make_capture(self):
        cv2 = _cv2()
        return cv2.VideoCapture(self.index)


def make_source(camera: CameraSettings) -> FrameSource:
    """The bare source described by ``camera`` (not opened)."""
    if camera.source == "folder":
        return FolderSource(camera.path, loop=camera.loop)
    if camera.source == "video":
        return VideoSource(camera.path, loop=camera.loop)
    if camera.source == "url":
        return UrlSource(camera.path)
    if camera.source == "usb":
        return UsbSource(camera.device_index)
    raise ValueError(f"unknown camera source {camera.source!r}")  # settings validation prevents this


# ------------------------------------------------------------------------------------------ reconnecting


class ReconnectingSource:
    """Reopens ``inner`` with exponential backoff whenever it raises :class:`SourceConnectionError`.

    ``reconnects`` counts reopen attempts (successful or not), ``reconnected`` the successful ones.
    ``down_since`` is the ``clock()`` time since which no frame came (None while frames come).
    ``sleep(seconds)`` may return True to abort (e.g. ``threading.Event.wait``): then
    :class:`SourceConnectionError` is raised. Gives up after ``max_reconnects`` failed attempts in a row
    (-1 = never). A reopen that succeeds but gives no frame before failing again (a folder whose files all
    fail to decode, a video of unreadable frames, a stream that accepts the connection and sends nothing)
    counts as a failed attempt too: only a frame ends a run of failures.
    """

    def __init__(self, inner: FrameSource, *, initial_s: float = 0.5, max_s: float = 30.0,
                 max_reconnects: int = -1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep,
                 on_reconnect: Callable[[], None] | None = None):
        self.inner = inner
        self.name = inner.name
        self.initial_s = max(0.0, initial_s)
        self.max_s = max(self.initial_s, max_s)
        self.max_reconnects = max_reconnects
        self.clock = clock
        self.sleep = sleep
        self.on_reconnect = on_reconnect
        self.reconnects = 0
        self.reconnected = 0
        self.down_since: float | None = None
        self.last_error = ""
        self._opened = False
        self._failures = 0  # failed attempts since the last frame
        self._frameless_reopen = False  # reopened, no frame yet
        self._lock = threading.Lock()  # down_since is read by the health thread

    @property
    def unreadable(self) -> int:
        return int(getattr(self.inner, "unreadable", 0))

    @property
    def up(self) -> bool:
        return self._opened and self.down_since is None

    def down_for(self) -> float:
        """Seconds since the camera stopped giving frames (0 while it gives frames)."""
        with self._lock:
            since = self.down_since
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def _mark_down(self, error: Exception) -> None:
        self.last_error = str(error)
        with self._lock:
            if self.down_since is None:
                self.down_since = self.clock()

    def open(self) -> None:
        """Open, retrying with backoff when the first attempt fails."""
        try:
            self.inner.open()
            self._opened = True
        except SourceConnectionError as exc:
            log.warning("%s: open failed: %s", self.name, exc)
            self._mark_down(exc)
            self._reconnect()

    def _reconnect(self) -> None:
        backoff = Backoff(self.initial_s, self.max_s)
        for _ in range(self._failures):  # a reopen that gave no frame: keep backing off from where it was
            backoff.next_delay()
        while True:
            failures = self._failures
            if 0 <= self.max_reconnects <= failures:
                raise SourceConnectionError(
                    f"{self.name}: gave up after {failures} reconnect attempts ({self.last_error})")
            if self.sleep(backoff.next_delay()) is True:
                raise SourceConnectionError(f"{self.name}: stopped while reconnecting")
            self.reconnects += 1
            if self.on_reconnect is not None:
                self.on_reconnect()
            try:
                self.inner.close()
                self.inner.open()
            except SourceConnectionError as exc:
                self._failures += 1
                failures = self._failures
                self.last_error = str(exc)
                log.warning("%s: reconnect attempt %d failed: %s (next in %.2fs)", self.name, failures, exc,
                            backoff.delay)
                continue
            self._opened = True
            self._frameless_reopen = True
            self.reconnected += 1
            log.info("%s: reconnected after %d attempt(s)", self.name, failures + 1)
            return

    def read(self) -> np.ndarray:
        if not self._opened:
            self.open()
        while True:
            try:
                frame = self.inner.read()
            except SourceConnectionError as exc:
                log.warning("%s: %s", self.name, exc)
                self._mark_down(exc)
                self._opened = False
                if self._frameless_reopen:  # reopened fine, yet no frame: a failed attempt all the same
                    self._failures += 1
                self._reconnect()
                continue
            self._failures = 0
            self._frameless_reopen = False
            with self._lock:
                self.down_since = None
            return frame

    def close(self) -> None:
        self.inner.close()
        self._opened = False


def camera_source(camera: CameraSettings, *, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], object] = time.sleep,
                  on_reconnect: Callable[[], None] | None = None) -> ReconnectingSource:
    """The camera's source wrapped in reconnect logic as ``camera.reconnect_*`` says, not opened yet (its first
    :meth:`~ReconnectingSource.read` opens it)."""
    return ReconnectingSource(
        make_source(camera), initial_s=camera.reconnect_initial_s, max_s=camera.reconnect_max_s,
        max_reconnects=camera.max_reconnects, clock=clock, sleep=sleep, on_reconnect=on_reconnect)

