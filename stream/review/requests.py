"""Review requests and their audit trail, on Redis streams of the line (plain string fields, no serialised Python objects).

- ``<base>:reviews``: one entry per operator decision (:class:`ReviewRequest`), read by the workers' group
  :data:`REVIEW_GROUP`, so exactly one worker applies each; the entry id is the request id.
- ``<base>:audit``: one entry per applied or failed request (:class:`ReviewOutcome`): who, when, what, and
  what came of it (rows added to the memory, scores before and after, files written, latency).

:func:`submit_review` checks the frame is still kept (:class:`FrameNotKept` otherwise) and adds the request;
:func:`find_outcome` / :func:`wait_outcome` look its outcome up in the audit stream, from the request's time on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from stream.contracts import LineInspectError
from stream.entries import text
from stream.keys import LineKeys
from stream.review.archive import ReviewArchive

DECISIONS = ("ok", "defect")
REVIEW_GROUP = "reviewers"
MAX_FRAME_ID = 128
MAX_WHO = 64


class ReviewError(LineInspectError):
    """A review cannot be submitted or applied."""


class ReviewInputError(ReviewError):
    """A malformed request: unknown decision, empty or overlong frame id or name."""


class FrameNotKept(ReviewError):
    """The frame is not (or no longer) in the line's review window."""

    def __init__(self, frame_id: str, window_mib: float):
        super().__init__(f"frame {frame_id} is no longer kept (review window {window_mib:g} MiB per line)")
        self.frame_id = frame_id


def check_who(who: str) -> str:
    who = (who or "").strip()
    if not who or len(who) > MAX_WHO or not who.isprintable():
        raise ReviewInputError(f"operator name {who!r}: 1..{MAX_WHO} printable characters")
    return who


@dataclass(frozen=True)
class ReviewRequest:
    """An operator's decision on one kept frame. ``request_id`` is the reviews stream's entry id (set when read)."""

    line: str
    frame_id: str
    decision: str  # "ok": a false alarm, learn the frame as normal; "defect": a confirmed defect, keep it labelled
    who: str
    requested_ts: float
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ReviewInputError(f"decision {self.decision!r}: one of {', '.join(DECISIONS)}")
        if not self.frame_id or len(self.frame_id) > MAX_FRAME_ID or not self.frame_id.isprintable():
            raise ReviewInputError(f"frame id {self.frame_id[:MAX_FRAME_ID]!r}: 1..{MAX_FRAME_ID} printable "
                                   "characters")
        check_who(self.who)

    def fields(self) -> dict[str, str]:
        return {"line": self.line, "frame_id": self.frame_id, "decision": self.decision, "who": self.who,
                "requested_ts": repr(float(self.requested_ts))}

    @classmethod
    def from_entry(cls, entry_id: Any, raw: dict) -> ReviewRequest:
        """A request read from the stream; :class:`ReviewInputError` when its fields are missing or bad."""
        f = {text(k): text(v) for k, v in raw.items()}
        try:
            return cls(line=f["line"], frame_id=f["frame_id"], decision=f["decision"], who=f["who"],
                       requested_ts=float(f["requested_ts"]), request_id=text(entry_id))
        except (KeyError, ValueError) as exc:
            raise ReviewInputError(f"review request {text(entry_id)} unreadable: {type(exc).__name__}: {exc}") \
                from None


@dataclass(frozen=True)
class ReviewOutcome:
    """What came of one request (an audit stream entry)."""

    request_id: str
    line: str
    frame_id: str
    decision: str
    who: str
    requested_ts: float
    outcome: str  # "applied" | "failed"
    reason: str = ""  # why it failed, or a remark (e.g. the memory could not learn with this map source)
    worker: str = ""
    rows_added: int = 0  # memory rows the frame added ("ok")
    memory_rows: int = 0  # the memory's rows afterwards
    score_before: float = -1.0  # the frame's image score (1.0 = threshold) before and after; -1: not scored
    score_after: float = -1.0
    verdict_after: str = ""  # the verdict the frame gets now ("ok" / "defect")
    latency_s: float = 0.0  # request (its stream entry) to applied, on the Redis server's clock
    files: tuple[str, ...] = field(default_factory=tuple)  # labelled files written
    applied_ts: float = 0.0

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"

    def fields(self) -> dict[str, str]:
        out = {k: (json.dumps(list(v)) if k == "files" else repr(v) if isinstance(v, float) else str(v))
               for k, v in asdict(self).items()}
        return out

    @classmethod
    def from_fields(cls, raw: dict) -> ReviewOutcome:
        f = {text(k): text(v) for k, v in raw.items()}
        kw: dict[str, Any] = {}
        for fld in fields(cls):
            if fld.name not in f:
                continue
            value = f[fld.name]
            if fld.name == "files":
                kw[fld.name] = tuple(str(p) for p in json.loads(value))
            elif fld.type in ("float",):
                kw[fld.name] = float(value)
            elif fld.type in ("int",):
                kw[fld.name] = int(value)
            else:
                kw[fld.name] = value
        return cls(**kw)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = list(self.files)
        return d


def request_ms(request_id: str) -> int:
    """The Redis server time (ms) of a request id (a stream entry id ``<ms>-<seq>``)."""
    head, _, _ = request_id.partition("-")
    if not head.isdigit():
        raise ReviewInputError(f"request id {request_id!r}: expected a stream entry id like 1700000000000-0")
    return int(head)


def submit_review(client: Any, keys: LineKeys, archive: ReviewArchive, frame_id: str, decision: str, who: str,
                  maxlen: int = 10000) -> str:
    """Add a review request for a kept frame; its request id. :class:`FrameNotKept` when the frame is not kept,
    :class:`ReviewInputError` for a bad decision, frame id or name."""
    req = ReviewRequest(line=keys.line, frame_id=frame_id, decision=decision, who=who, requested_ts=time.time())
    if not client.hexists(keys.review("frames"), frame_id):
        raise FrameNotKept(frame_id, archive.window_mib())
    return text(client.xadd(keys.reviews, req.fields(), maxlen=maxlen, approximate=True))


def write_outcome(client: Any, keys: LineKeys, outcome: ReviewOutcome, maxlen: int = 100000) -> str:
    return text(client.xadd(keys.audit, outcome.fields(), maxlen=maxlen, approximate=True))


def find_outcome(client: Any, keys: LineKeys, request_id: str) -> ReviewOutcome | None:
    """The audit entry of ``request_id`` (written after the request, so read from its time on), or None yet."""
    start = request_ms(request_id)
    cursor = f"{start}-0"
    while True:
        entries = client.xrange(keys.audit, min=cursor, max="+", count=200)
        for _, raw in entries:
            if text(raw.get(b"request_id", raw.get("request_id", b""))) == request_id:
                return ReviewOutcome.from_fields(raw)
        if len(entries) < 200:
            return None
        cursor = "(" + text(entries[-1][0])


def wait_outcome(client: Any, keys: LineKeys, request_id: str, timeout_s: float,
                 poll_s: float = 0.1) -> ReviewOutcome | None:
    """:func:`find_outcome` until it answers or ``timeout_s`` passed (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = find_outcome(client, keys, request_id)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(poll_s)


def recent_outcomes(client: Any, keys: LineKeys, n: int = 20) -> list[ReviewOutcome]:
    """The ``n`` newest audit entries, newest first."""
    return [ReviewOutcome.from_fields(raw) for _, raw in client.xrevrange(keys.audit, count=n)]
