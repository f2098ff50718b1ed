"""The stream layer (stream.entries, stream.reader, stream.cache) against the real Redis."""

from __future__ import annotations

import asyncio

import pytest

from stream.cache import BoundedCache
from stream.entries import PAYLOAD_FIELD, entries_of, text
from stream.reader import FROM_START, StreamCursor, follow, follow_async, mark_now, read_group
from stream.redisclient import connect


def test_entries_take_the_payload_field_and_mark_entries_without_fields():
    reply = [[b"s", [(b"1-0", {PAYLOAD_FIELD: b"x"}), (b"2-0", {b"other": b"y"}), (b"3-0", None)]]]
    a, b, c = entries_of(reply)
    assert (a.stream, a.entry_id, a.payload, a.deleted) == ("s", "1-0", b"x", False)
    assert b.payload is None and not b.deleted
    assert c.payload is None and c.deleted
    assert text(b"7-1") == text("7-1") == "7-1"


def test_follow_from_now_reads_only_what_comes_after_and_never_twice(redis_client, key_prefix):
    a, b = f"{key_prefix}:a", f"{key_prefix}:b"
    redis_client.xadd(a, {PAYLOAD_FIELD: b"old"})
    cursor = StreamCursor.from_now([a, b])
    mark_now(redis_client, cursor)  # the start is fixed here: what follows is all read
    redis_client.xadd(a, {PAYLOAD_FIELD: b"a1"})
    redis_client.xadd(b, {PAYLOAD_FIELD: b"b1"})
    got = follow(redis_client, cursor, count=10, block_ms=100)
    assert [(e.stream, e.payload) for e in got] == [(a, b"a1"), (b, b"b1")]
    assert follow(redis_client, cursor, count=10, block_ms=50) == []
    cursor.rewind_to_now(a)
    redis_client.xadd(b, {PAYLOAD_FIELD: b"b2"})
    assert [e.payload for e in follow(redis_client, cursor, count=10, block_ms=50)] == [b"b2"]


def test_follow_from_start_and_async(redis_client, redis_url, key_prefix):
    s = f"{key_prefix}:s"
    for i in range(3):
        redis_client.xadd(s, {PAYLOAD_FIELD: b"%d" % i})
    assert [e.payload for e in follow(redis_client, StreamCursor({s: FROM_START}), count=10, block_ms=50)] == [
        b"0", b"1", b"2"]

    async def scenario():
        client = connect(redis_url, asyncio=True)
        try:
            cursor = StreamCursor.from_now([s])
            assert await follow_async(client, cursor, count=10, block_ms=50) == []
            await client.xadd(s, {PAYLOAD_FIELD: b"new"})
            return [e.payload for e in await follow_async(client, cursor, count=10, block_ms=50)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"new"]


def test_read_group_gives_each_entry_once(redis_client, key_prefix):
    s = f"{key_prefix}:g"
    redis_client.xgroup_create(s, "grp", id="0", mkstream=True)
    redis_client.xadd(s, {PAYLOAD_FIELD: b"one"})
    got = read_group(redis_client, "grp", "c1", [[s]], count=10, block_ms=50)
    assert [(e.stream, e.payload) for e in got] == [(s, b"one")]
    assert read_group(redis_client, "grp", "c2", [[s]], count=10, block_ms=50) == []


def test_bounded_cache_by_items_and_bytes():
    by_items: BoundedCache[int] = BoundedCache(max_items=2)
    for i, k in enumerate("abc"):
        by_items.put(k, i)
    assert by_items.get("a") is None and by_items.get("c") == 2 and len(by_items) == 2
    by_bytes: BoundedCache[bytes] = BoundedCache(max_bytes=10, size_of=len)
    by_bytes.put("x", b"12345678")
    by_bytes.put("y", b"1234")
    assert "x" not in by_bytes and "y" in by_bytes and by_bytes.bytes == 4
    by_bytes.put("z", b"x" * 50)  # the newest is kept even alone over the budget
    assert "z" in by_bytes and len(by_bytes) == 1
    with pytest.raises(ValueError):
        BoundedCache(max_items=0)
