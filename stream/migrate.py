"""``lineinspect redis migrate-keys --to line_tag|plain``: rename a deployment's keys from one layout to the
other (``redis.key_layout``, see :mod:`stream.keys`), on a single Redis node.

Stop every lineinspect process of the deployment first (ingest, workers, alerts, preview): a process still
running writes keys of its old layout. The command SCANs ``<prefix>:*``, renames each key of a line
(``<prefix>:<line>:<rest>`` <-> ``<prefix>:{<line>}:<rest>``) with ``RENAMENX`` (an existing target is never
overwritten: it is reported as a conflict and the source is kept), leaves ``<prefix>:lines`` as it is, and
prints what it did. ``--dry-run`` prints the plan only. Then set ``redis.key_layout`` to the new layout.

To move a single node's data to a cluster: migrate to ``line_tag`` here, then copy the keys with
``redis-cli --cluster import <cluster-node:port> --cluster-from <single-node:port> --cluster-copy``
(deploy/README.md, Redis Cluster).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from stream.keys import line_keys, lines_index

if TYPE_CHECKING:
    from config.settings import Settings


def target_key(key: str, prefix: str, to: str) -> str | None:
    """The name of ``key`` in layout ``to``, or None when it is not a line's key of the other layout."""
    if not key.startswith(prefix + ":") or key == lines_index(prefix):
        return None
    rest = key[len(prefix) + 1:]
    if to == "line_tag":
        if rest.startswith("{"):
            return None  # already tagged
        line, sep, tail = rest.partition(":")
        return f"{line_keys(prefix, line, 'line_tag').base}:{tail}" if sep and line else None
    if not rest.startswith("{") or "}:" not in rest:
        return None
    line, _, tail = rest[1:].partition("}:")
    return f"{line_keys(prefix, line, 'plain').base}:{tail}" if line else None


def migrate(client: Any, prefix: str, to: str, *, dry_run: bool = False, out=sys.stdout) -> dict[str, int]:
    """Rename the keys of ``prefix`` to layout ``to``; returns counts renamed, conflicts, skipped."""
    counts = {"renamed": 0, "conflicts": 0, "skipped": 0}
    names = [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(f"{prefix}:*", count=1000)]
    for key in sorted(names):
        new = target_key(key, prefix, to)
        if new is None:
            counts["skipped"] += 1
            continue
        if dry_run:
            print(f"would rename {key} -> {new}", file=out)
            counts["renamed"] += 1
        elif client.renamenx(key, new):
            print(f"renamed {key} -> {new}", file=out)
            counts["renamed"] += 1
        else:
            print(f"CONFLICT {new} exists: {key} kept", file=out)
            counts["conflicts"] += 1
    return counts


def main(settings: Settings, args: argparse.Namespace) -> int:
    rs = settings.redis
    if args.action != "migrate-keys":  # pragma: no cover - argparse allows only migrate-keys
        return 2
    if rs.is_cluster:
        print("lineinspect redis migrate-keys: runs on a single node (redis.cluster is set); migrate there, then "
              "redis-cli --cluster import (deploy/README.md)", file=sys.stderr)
        return 2
    from stream.redisclient import make_client

    client = make_client(rs)
    try:
        counts = migrate(client, rs.key_prefix, args.to, dry_run=args.dry_run)
    finally:
        client.close()
    print(f"{'plan' if args.dry_run else 'done'}: {counts['renamed']} key(s) {'to rename' if args.dry_run else 'renamed'}"
          f", {counts['conflicts']} conflict(s), {counts['skipped']} other key(s) left; now set "
          f"redis.key_layout: {args.to}")
    return 1 if counts["conflicts"] else 0
