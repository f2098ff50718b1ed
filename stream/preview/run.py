"""``lineinspect preview``: the preview server as a process, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from config.settings import Settings
from stream.contracts import QueueUnavailableError
from stream.preview.options import PreviewConfigError, PreviewOptions, PreviewUnavailable, require_webrtc
from stream.preview.server import PreviewServer
from stream.redact import redact_text

log = logging.getLogger(__name__)


async def serve(options: PreviewOptions, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the preview until ``stop`` is set (or SIGINT/SIGTERM when no event is given)."""
    server = PreviewServer(options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"preview: http://{options.host}:{server.port}/?token=<preview.token>", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        log.info("preview: stopped")


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``lineinspect preview``: 0 after a clean shutdown, 2 on a configuration problem, 3 without aiortc."""
    import sys

    try:
        options = PreviewOptions.from_settings(settings, args)
    except PreviewConfigError as exc:
        print(f"lineinspect preview: {exc}", file=sys.stderr)
        return 2
    try:
        require_webrtc()
    except PreviewUnavailable as exc:
        print(f"lineinspect preview: {exc}", file=sys.stderr)
        return 3
    try:
        asyncio.run(serve(options))
    except QueueUnavailableError as exc:
        print(f"lineinspect preview: {redact_text(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # port in use, address not available
        print(f"lineinspect preview: cannot serve on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    return 0
