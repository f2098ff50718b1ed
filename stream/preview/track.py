"""A viewer's WebRTC video track: the newest frame of its line source, each time the encoder asks."""

from __future__ import annotations

from typing import Any

from stream.preview.source import LineSource


def viewer_track_class() -> type:
    """The aiortc track class handed to each peer (built lazily: importing this module needs no aiortc)."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class LineViewerTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self, source: LineSource, on_stop: Any):
            super().__init__()
            self.source = source
            self._seen = 0
            self._on_stop = on_stop

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            rendered, self._seen = await self.source.wait_newer(self._seen)
            if rendered is None:
                self.stop()
                raise MediaStreamError
            return rendered.to_video_frame()  # a frame of its own: encoders modify what they are given

        def stop(self) -> None:
            if self.readyState == "live":
                super().stop()
                self._on_stop(self)

    return LineViewerTrack
