"""Alert service: defect results of one or more lines -> debounced alerts -> webhook, Redis stream, MQTT.

``lineinspect alerts --line L [--line L2]`` reads each line's results stream with its own consumer group
(``alerts``; created at ``$`` the first time, so a restarted service resumes where it stopped and never sees
results from before its first start). Every defect result goes through the debouncer (:mod:`stream.alerts.debounce`):

* an alert is raised when ``alerts.debounce_count`` defective frames of a line fall within
  ``alerts.debounce_window_s`` seconds (good frames in between do not reset the count);
* after an alert the line is quiet for ``alerts.cooldown_s``; defect results in that time are counted as
  suppressed (reason ``cooldown``) and do not count towards the next alert.

Drift (:mod:`stream.alerts.drift`): each line's results are compared with its calibration over a rolling window;
when most frames have moved over the threshold the service sends one "line appearance changed" event through
the sinks and suppresses the line's defect alerts (reason ``drift``) until "line appearance restored".

Results older than ``stale_after_s`` (wall clock, from the worker's ``processed_ts``) are suppressed with
reason ``stale``: a service that was down for an hour does not page for defects the line had an hour ago.

Snapshot choice: the worker's result carries the label mask (PNG) but not the image, and the worker deletes
a frame from the frames stream (``XDEL``) as soon as its result is published. So the service keeps its own
short memory of frames: :class:`FrameTail` follows each line's frames stream with plain ``XREAD`` (no consumer
group: the workers are not affected) and keeps the most recent frames up to a byte budget
(``frame_cache_bytes``, 32 MiB by default). For an alert the frame is taken from there, else looked up in the
frames stream itself (a bounded ``XRANGE`` from a few seconds before the capture time: works when the entry was
not deleted yet), and the mask and boxes are drawn over it (JPEG, ``snapshot.source = "frame"``). When the
frame is in neither (the workers lag by more frames than the budget holds, or the service started after the
frame), the mask alone is drawn (PNG, ``source = "mask"``). No snapshot key is written by the worker: that
would cost a Redis write for every frame to serve the few that alert.

Delivery: each sink (:class:`WebhookSink`, :class:`RedisStreamSink`, :class:`MqttSink`) runs behind its own
bounded queue and thread (:class:`SinkWorker`). A failing delivery is retried with exponential backoff
(``retry_initial_s`` doubling up to ``retry_max_s``, at most ``max_retries`` retries), counted in
:class:`AlertMetrics` and logged; a full queue drops the alert for that sink (outcome ``dropped``). Reading
results never waits for a sink. Results are acknowledged once the alert is queued, so an alert still queued
when the process dies is lost (at-most-once per sink after the queue; receivers can dedupe on ``alert_id``).

The modules: ``debounce`` (when defects become an alert), ``drift`` (when the line's appearance changed),
``alert`` (the alert and the drift event as sent), ``frames`` (the frame
tail and the stream lookup), ``snapshot`` (drawing it), ``sinks`` and ``mqtt`` (where alerts go),
``delivery`` (a queue and thread per sink), ``service`` (reading results, raising alerts), ``run`` (the
process: ``lineinspect alerts``).
"""
