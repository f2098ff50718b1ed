#!/usr/bin/env python3
"""A test camera: GStreamer's RTSP server (Debian ``gir1.2-gst-rtsp-server-1.0``) serving a live
``videotestsrc`` as H.264 at ``rtsp://[user:password@]127.0.0.1:PORT/stream``.

Runs with the SYSTEM python3 (``python3-gi``), not the project's venv::

    /usr/bin/python3 deploy/rtsp_camera.py --port 8554 --width 640 --height 360 --fps 25 [--user u --password p]

Signals: SIGUSR1 stalls the stream (no more frames, the RTSP/RTP sockets stay open, a reconnect is answered but
gets no frames either: a frozen camera), SIGUSR2
resumes it; SIGTERM/SIGINT stop the server. Prints ``READY rtsp://127.0.0.1:PORT/stream`` once listening.
Used by tests/test_rtsp.py and the soak benchmark (deploy/soak.py).
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--bitrate", type=int, default=800, help="kbit/s")
    p.add_argument("--pattern", default="ball")
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")
    args = p.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern={args.pattern} "
        f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
        "! valve name=stall drop=false ! videoconvert "
        f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate={args.bitrate} key-int-max={args.fps} "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)  # one pipeline for every client: SIGUSR1 stalls all of them
    valves = []
    state = {"stalled": False}

    def _configured(_factory, media):  # a new media (a client came after the last one left) stalls as well
        valve = media.get_element().get_by_name("stall")
        valve.set_property("drop", state["stalled"])
        valves.append(valve)

    factory.connect("media-configure", _configured)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
        perms = GstRtspServer.RTSPPermissions()
        perms.add_permission_for_role("user", "media.factory.access", True)
        perms.add_permission_for_role("user", "media.factory.construct", True)
        factory.set_permissions(perms)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()

    def _stall(drop: bool):
        state["stalled"] = drop
        for v in valves:
            v.set_property("drop", drop)
        print("STALLED" if drop else "RESUMED", flush=True)
        return GLib.SOURCE_CONTINUE

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, _stall, True)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR2, _stall, False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, lambda: (loop.quit(), GLib.SOURCE_REMOVE)[1])
    print(f"READY rtsp://127.0.0.1:{args.port}/stream", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
