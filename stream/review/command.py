"""``lineinspect review``: an operator's decision on a kept frame, from a script, or the recent kept verdicts.

::

    lineinspect review --line L FRAME_ID ok|defect [--who NAME] [--wait SECONDS]
    lineinspect review --line L --list [N] [--defects]

``ok``: a false alarm (the frame joins the line's memory and calibration, and the labelled folder's good
images); ``defect``: a confirmed defect (image and mask into the labelled folder). With ``--wait`` the command
waits for a worker's outcome (the audit entry) and prints it as JSON. Exit codes: 0 submitted (and applied
with ``--wait``), 1 failed, not kept or no outcome in time, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from config.settings import Settings
from stream.keys import line_keys
from stream.review.archive import ReviewArchive
from stream.review.requests import (
    FrameNotKept,
    ReviewInputError,
    submit_review,
    wait_outcome,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _list(client, keys, archive: ReviewArchive, n: int, defects_only: bool) -> int:
    from stream.wire import decode_result

    for kept in archive.recent(n, defects_only):
        r = decode_result(kept.result)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kept.ts))
        print(f"{kept.frame_id}\t{r.verdict.value}\t{r.image_score:.3f}\t{len(r.defects)} defect(s)\t{when}")
    total, count = archive.stats()
    print(f"# {count} frame(s) kept, {total / (1 << 20):.1f} of {archive.window_mib():g} MiB", file=sys.stderr)
    return EXIT_OK


def main(settings: Settings, args: argparse.Namespace) -> int:
    from stream.redisclient import make_client

    rs = settings.review
    keys = line_keys(settings.redis.key_prefix, args.line, settings.redis.key_layout)
    client = make_client(settings.redis)
    archive = ReviewArchive(client, keys, rs.keep_bytes)
    try:
        if args.list is not None:
            return _list(client, keys, archive, args.list, args.defects)
        if not args.frame_id or not args.decision:
            print("lineinspect review: FRAME_ID and ok|defect are needed (or --list)", file=sys.stderr)
            return EXIT_USAGE
        try:
            request_id = submit_review(client, keys, archive, args.frame_id, args.decision, args.who,
                                       rs.requests_maxlen)
        except ReviewInputError as exc:
            print(f"lineinspect review: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except FrameNotKept as exc:
            print(f"lineinspect review: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"review {request_id}: frame {args.frame_id} {args.decision} by {args.who} submitted", flush=True)
        if args.wait <= 0:
            return EXIT_OK
        outcome = wait_outcome(client, keys, request_id, args.wait)
        if outcome is None:
            print(f"lineinspect review: no worker applied {request_id} within {args.wait:g} s (is a worker of "
                  f"line {args.line} running with review.enabled?)", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(outcome.as_json(), indent=2))
        return EXIT_OK if outcome.applied else EXIT_FAILED
    finally:
        client.close()
