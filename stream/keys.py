"""Redis key layout, in one place. Every process derives names from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LineKeys:
    prefix: str
    line: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, self.line, *parts))

    @property
    def frames(self) -> str:  # stream of encoded frames (consumer group of workers)
        return self._k("frames")

    @property
    def results(self) -> str:  # stream of encoded results
        return self._k("results")

    @property
    def results_channel(self) -> str:  # pub/sub channel, same payload as the results stream
        return self._k("results", "live")

    @property
    def dead_letter(self) -> str:  # stream: fields payload, reason, entry_id, deliveries, worker
        return self._k("deadletter")

    @property
    def alerts(self) -> str:  # stream of alerts (JSON)
        return self._k("alerts")

    def done(self, frame_id: str) -> str:  # idempotency key: one result per frame id
        return self._k("done", frame_id)

    def memory(self, part: str) -> str:  # normal memory of the line (see workers.memory)
        return self._k("memory", part)

    @property
    def failures(self) -> str:  # hash: entry id -> the last failure of a pending entry (job_timeout, inspect)
        return self._k("failures")

    @property
    def identity(self) -> str:  # token made when the stream was first written (a restart that lost it: new token)
        return self._k("identity")

    @property
    def heartbeat(self) -> str:  # hash: worker id -> last heartbeat unix time
        return self._k("workers")


def line_keys(prefix: str, line: str) -> LineKeys:
    return LineKeys(prefix=prefix, line=line)


def lines_index(prefix: str) -> str:
    """Set of line ids seen by ingest processes (the preview lists them)."""
    return f"{prefix}:lines"
