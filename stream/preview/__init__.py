"""``lineinspect preview``: live camera frames with the latest defect overlay, over WebRTC.

An aiohttp server (built with aiortc) for operators:

- ``GET /?token=T`` a small page listing the lines (Redis set ``lines_index(prefix)``); opening a line (or
  ``/?token=T&line=L``) starts a WebRTC video track of that line's frames with results drawn on them;
- ``GET /api/lines`` the lines as JSON, ``POST /api/offer`` the signalling (SDP offer in, answer out);
- ``/static/`` the page's script and style (no data in them, served without the token).

Access: every route but ``/static/`` needs ``settings.preview.token``, given as the ``token`` query parameter,
an ``X-Preview-Token`` header or ``Authorization: Bearer``; compared in constant time. No token -> 401,
wrong token -> 403. The server refuses to start with an empty token and sends no CORS headers.

Media: one line source (:mod:`stream.preview.source`) per (line, camera filter) reads the line's frames stream with a blocking
``XREAD`` from ``$`` (never the workers' consumer group, so it takes no frames from them; workers ``XDEL``
processed entries, which is why it must read them as they arrive) together with the results stream. When
it falls behind it skips to the newest frame. A frame is drawn with the result of the same frame id when
that result arrives within ``result_wait_s``, else with the latest result of its camera. Frames keep their
timing: ``pts`` comes from the capture time (90 kHz clock). The rendered frame is fanned out to every viewer
of the line; a source stops when its last viewer leaves. Peers are closed when their connection fails or
closes and on shutdown.

aiortc and PyAV are optional (``pip install 'lineinspect[preview]'``): they are imported only inside the
functions that need them, so importing this package never pulls them in.

The modules: ``options`` (settings, the optional dependencies), ``access`` (token and response headers),
``render`` (a frame with its overlay, as video), ``source`` (one line's frames and results, read and
rendered), ``track`` (a viewer's WebRTC track), ``server`` (routes, signalling, viewers), ``run`` (the
process: ``lineinspect preview``).
"""
