"""The preview's options (from settings and command-line flags) and its optional WebRTC dependencies."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from config.settings import RedisSettings, ReviewSettings, Settings
from stream.contracts import LineInspectError

INSTALL_HINT = "pip install 'lineinspect[preview]'"


class PreviewUnavailable(LineInspectError):
    """The optional WebRTC dependencies (aiortc, PyAV) are not installed."""


class PreviewConfigError(LineInspectError):
    """The preview cannot start with these settings (e.g. no token)."""


@dataclass(frozen=True)
class PreviewOptions:
    redis: RedisSettings  # url, key prefix and layout, timeouts, TLS, cluster: the client is make_client's
    host: str
    port: int
    token: str
    max_side: int = 1280  # frames are downscaled so that their longer side is at most this (0 = never)
    result_wait_s: float = 0.25  # hold a frame this long for the result of the same frame id
    block_ms: int = 1000
    max_viewers: int = 32
    review: ReviewSettings = field(default_factory=ReviewSettings)  # the review panel (stream.preview.review_api)

    def __post_init__(self) -> None:
        if not self.token:
            raise PreviewConfigError(
                "preview.token is empty: set one (e.g. LINEINSPECT__PREVIEW__TOKEN=$(openssl rand -hex 16)); "
                "the preview refuses to start without a token")
        if self.max_side < 0 or self.result_wait_s < 0 or self.block_ms <= 0 or self.max_viewers <= 0:
            raise PreviewConfigError(
                f"bad preview options: max_side={self.max_side} result_wait_s={self.result_wait_s} "
                f"block_ms={self.block_ms} max_viewers={self.max_viewers}")

    @classmethod
    def from_settings(cls, settings: Settings, args: argparse.Namespace | None = None) -> PreviewOptions:
        extra: dict[str, float | int] = {}
        if args is not None:
            if getattr(args, "max_side", None) is not None:
                extra["max_side"] = int(args.max_side)
            if getattr(args, "result_wait_ms", None) is not None:
                extra["result_wait_s"] = float(args.result_wait_ms) / 1000.0
            if getattr(args, "max_viewers", None) is not None:
                extra["max_viewers"] = int(args.max_viewers)
        return cls(redis=settings.redis, host=settings.preview.host, port=settings.preview.port,
                   token=settings.preview.token, review=settings.review, **extra)


def require_webrtc() -> None:
    """Raise :class:`PreviewUnavailable` with the install hint when aiortc or PyAV cannot be imported."""
    try:
        import aiohttp  # noqa: F401
        import aiortc  # noqa: F401
        import av  # noqa: F401
    except ImportError as exc:
        raise PreviewUnavailable(
            f"the WebRTC preview needs aiortc, PyAV and aiohttp ({exc}); install them with: {INSTALL_HINT}") \
            from None
