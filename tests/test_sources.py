"""Camera sources on real files (OpenCV), and the reconnect logic with an injected clock/sleep."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from config.settings import CameraSettings
from stream.contracts import SourceConnectionError, SourceExhausted
from stream.sources import (
    FolderSource,
    ReconnectingSource,
    UrlSource,
    VideoSource,
    camera_source,
    make_source,
)
from tests.conftest import free_port


def _write_images(folder, n, start=0, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        img = np.full((*size, 3), (i * 20) % 256, np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)


class FakeClock:
    """Injected time: sleep() advances it and records the delays asked for."""

    def __init__(self, on_sleep=None):
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))
        return False


def test_folder_sorted_skips_unreadable_and_ends(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "001b.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    src = FolderSource(tmp_path)
    src.open()
    values = [int(src.read()[0, 0, 0]) for _ in range(3)]
    assert values == [0, 20, 40]  # sorted order, the corrupt file skipped
    assert src.unreadable == 1
    with pytest.raises(SourceExhausted):
        src.read()


def test_folder_loop_and_missing_folder(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    src = FolderSource(tmp_path / "imgs", loop=True)
    src.open()
    assert [int(src.read()[0, 0, 0]) for _ in range(5)] == [0, 20, 0, 20, 0]
    with pytest.raises(SourceConnectionError):
        FolderSource(tmp_path / "nope").open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceConnectionError):
        FolderSource(tmp_path / "empty").open()


def test_folder_of_only_unreadable_files_in_loop_is_a_connection_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"xx")
    (tmp_path / "b.png").write_bytes(b"yy")
    src = FolderSource(tmp_path, loop=True)
    src.open()
    with pytest.raises(SourceConnectionError, match="decodes"):
        src.read()
    assert src.unreadable == 2


def _write_video(path, n, size=(48, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((*size, 3), 30 * i, np.uint8))
    writer.release()


def test_video_file_ends_or_loops(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, 4)
    src = VideoSource(path)
    src.open()
    frames = [src.read() for _ in range(4)]
    assert all(f.shape == (48, 64, 3) for f in frames)
    assert [round(f.mean() / 30) for f in frames] == [0, 1, 2, 3]
    with pytest.raises(SourceExhausted):
        src.read()
    src.close()

    looping = make_source(CameraSettings(source="video", path=str(path), loop=True))
    looping.open()
    means = [round(looping.read().mean() / 30) for _ in range(6)]
    assert means == [0, 1, 2, 3, 0, 1]
    looping.close()


def test_video_deleted_mid_run_is_a_connection_error(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, 2)
    src = VideoSource(path, loop=True)
    src.open()
    src.read()
    path.unlink()
    with pytest.raises(SourceConnectionError):
        for _ in range(3):  # the open handle may still give the buffered frames
            src.read()
    with pytest.raises(SourceConnectionError):
        src.open()


def test_reconnect_backoff_doubles_caps_and_gives_up(tmp_path):
    folder = tmp_path / "cam"
    _write_images(folder, 2)
    fake = FakeClock()
    src = ReconnectingSource(FolderSource(folder, loop=True), initial_s=0.5, max_s=2.0, max_reconnects=5,
                             clock=fake.clock, sleep=fake.sleep)
    src.open()
    src.read()
    assert src.up and src.down_for() == 0.0
    for p in folder.iterdir():  # the camera vanishes
        p.unlink()
    with pytest.raises(SourceConnectionError, match="gave up after 5"):
        src.read()
    assert fake.sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert src.reconnects == 5 and src.reconnected == 0
    assert src.down_for() == pytest.approx(7.5)


def test_reconnect_recovers_when_the_camera_comes_back(tmp_path):
    folder = tmp_path / "cam"
    _write_images(folder, 1)
    calls = []

    def come_back(n_sleeps):
        if n_sleeps == 3:  # the folder is filled again during the 3rd wait
            _write_images(folder, 2, start=5)

    fake = FakeClock(on_sleep=come_back)
    src = ReconnectingSource(FolderSource(folder, loop=True), initial_s=0.1, max_s=1.0, max_reconnects=-1,
                             clock=fake.clock, sleep=fake.sleep, on_reconnect=lambda: calls.append(1))
    src.open()
    assert int(src.read()[0, 0, 0]) == 0
    (folder / "000.png").unlink()
    frame = src.read()  # blocks in the reconnect loop until the folder is back
    assert int(frame[0, 0, 0]) == 100
    assert src.reconnects == 3 and src.reconnected == 1 and len(calls) == 3
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert src.down_for() == 0.0


def test_sleep_returning_true_aborts_reconnect(tmp_path):
    src = ReconnectingSource(FolderSource(tmp_path / "missing"), initial_s=0.1, sleep=lambda s: True)
    with pytest.raises(SourceConnectionError, match="stopped"):
        src.open()
    assert src.reconnects == 0


@pytest.mark.timeout(60)
def test_url_that_refuses_is_retried_and_counted():
    port = free_port()  # nothing listens here
    camera = CameraSettings(source="url", path=f"http://127.0.0.1:{port}/stream.mjpg",
                            reconnect_initial_s=0.01, reconnect_max_s=0.02, max_reconnects=2)
    t0 = time.monotonic()
    src = ReconnectingSource(make_source(camera), initial_s=0.01, max_s=0.02, max_reconnects=2)
    with pytest.raises(SourceConnectionError, match="gave up after 2"):
        src.open()
    assert src.reconnects == 2 and src.reconnected == 0 and "cannot open" in src.last_error
    with pytest.raises(SourceConnectionError):
        camera_source(camera).open()
    assert time.monotonic() - t0 < 30
    src = UrlSource(f"rtsp://user:secret@127.0.0.1:{port}/x")
    assert "secret" not in src.name
