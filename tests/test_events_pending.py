"""A worker's pending events as pure objects: what the live path keeps and what a crash replay of the same journal
records keeps must be the same events, keyed like the database ((day, identity), first wins)."""

from __future__ import annotations

import asyncio
import os

import orjson
import psycopg
import pytest

from fastcount.features.events import PendingEvents
from fastcount.features.events.validation import Clock, check_event
from fastcount.store.journal import JournalFile

NOW = 1_800_000_000
DAY = 86_400
CLOCK = Clock(NOW, 5.0, 90 * DAY)


def live_and_replayed(bodies: list[object]) -> tuple[dict[object, object], dict[object, object]]:
    """The pending events after accepting each body live, and the events a replay of their journal records gives."""
    live = PendingEvents(max_pending=1000, flush_max=1000)
    records = []
    for body in bodies:
        record = orjson.dumps(body)
        if isinstance(body, list):
            assert live.add_many([check_event(item, CLOCK) for item in body], record) is None
        else:
            identity, event = check_event(body, CLOCK)
            assert live.add_one(identity, event, record).status == 202
        records.append(record)
    replayed = PendingEvents(max_pending=1000, flush_max=1000).replay(records)
    return dict(live.pending), dict(replayed.events)


def event(**changes: object) -> dict[str, object]:
    return {"event_name": "buy", "channel": "web", "user_id": "u1", "timestamp": NOW - 10, "event_id": "X", **changes}


def test_same_identity_different_content_first_wins_live_and_in_replay() -> None:
    live, replayed = live_and_replayed([event(), event(event_name="refund")])
    assert live == replayed
    assert [e["event_name"] for e in live.values()] == ["buy"]  # type: ignore[index]


def test_same_identity_different_content_in_one_bulk_first_wins_live_and_in_replay() -> None:
    live, replayed = live_and_replayed([[event(), event(event_name="refund")], event(event_name="other")])
    assert live == replayed
    assert [e["event_name"] for e in live.values()] == ["buy"]  # type: ignore[index]


def test_same_event_id_on_two_utc_days_is_two_events_live_and_in_replay() -> None:
    day_start = NOW // DAY * DAY
    first, second = event(timestamp=day_start - 5), event(timestamp=day_start + 5, event_name="refund")
    live, replayed = live_and_replayed([first, second, event(timestamp=day_start - 1, event_name="again")])
    assert live == replayed
    assert sorted(e["event_name"] for e in live.values()) == ["buy", "refund"]  # type: ignore[index]
    assert sorted(day for day, _ in live) == [day_start // DAY - 1, day_start // DAY]  # type: ignore[misc]


def test_pending_bytes_bound_gives_503_until_the_batch_is_acknowledged() -> None:
    flushes: list[int] = []
    body = event(event_id=None, metadata={"pad": "x" * 900})
    record_size = len(orjson.dumps(body))
    cost = 3 * record_size + 512
    buffer = PendingEvents(max_pending=1000, flush_max=1000, max_pending_bytes=cost * 10)
    buffer.request_flush = lambda: flushes.append(len(buffer.pending))
    statuses = []
    for i in range(12):
        identity, accepted = check_event({**body, "user_id": f"u{i}"}, CLOCK)
        statuses.append(buffer.add_one(identity, accepted, orjson.dumps({**body, "user_id": f"u{i}"})).status)
    assert statuses == [202] * 10 + [503] * 2
    assert flushes[0] == 5  # half the bytes bound asks for an early flush
    assert buffer.backlog_full() and buffer.refuses(1, 1)
    many = [check_event({**body, "user_id": f"m{i}"}, CLOCK) for i in range(2)]
    assert buffer.add_many(many, orjson.dumps([item for _, item in many])) is not None
    batch = buffer.take()
    assert batch is not None and len(batch.events) == 10
    assert buffer.backlog_full(), "the batch in retry still counts"
    buffer.acknowledge()
    assert not buffer.backlog_full() and buffer.pending_bytes == buffer.unacknowledged_bytes == 0
    assert not buffer.refuses(record_size * 20, 5), "nothing is held: even a body past the bound is taken"
    assert buffer.add_many(many, orjson.dumps([item for _, item in many])) is None
    assert 0 < buffer.pending_bytes <= 2 * cost + 100
    # Before validating: a body that alone would pass the bound (3 x its size + 512 per item) is refused.
    room = cost * 10 - buffer.pending_bytes - 2 * 512
    assert buffer.refuses(room // 3 + 1, 2) and not buffer.refuses(room // 3, 2)
    counted = PendingEvents(max_pending=5, flush_max=5)
    assert counted.refuses(1, 6) and not counted.refuses(1, 5), "an array of more events than the count bound holds"


def test_one_request_larger_than_the_bytes_bound_is_taken_when_nothing_is_held() -> None:
    buffer = PendingEvents(max_pending=1000, flush_max=1000, max_pending_bytes=100)
    identity, accepted = check_event(event(), CLOCK)
    assert buffer.add_one(identity, accepted, orjson.dumps(event())).status == 202
    identity, accepted = check_event(event(event_id="Y"), CLOCK)
    assert buffer.add_one(identity, accepted, orjson.dumps(event(event_id="Y"))).status == 503


def test_duplicates_count_only_once_their_transaction_committed(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastcount.features.events as events_feature

    # Attempt 1 (rolled back): 2 inserted. Attempt 2: the whole batch refused (a data error), then its halves: 1
    # inserted and 0.
    writes: list[int | None] = [2, None, 1, 0]

    async def write_batch(conn: object, batch: object) -> int:
        inserted = writes.pop(0)
        if inserted is None:
            raise psycopg.errors.NumericValueOutOfRange("refused")
        return inserted

    monkeypatch.setattr(events_feature, "write_batch", write_batch)
    buffer = PendingEvents(max_pending=1000, flush_max=1000)
    records = [orjson.dumps([event(event_id=f"e{i}") for i in range(4)]), orjson.dumps(event(event_id="e0"))]
    adopted = buffer.replay(records)
    assert len(adopted.events) == 4

    async def flush() -> None:
        await buffer.write(None, adopted)  # type: ignore[arg-type]
        buffer.transaction_ended(committed=False)
        assert buffer.duplicates == 0, "a rolled-back attempt counts nothing"
        with pytest.raises(psycopg.DataError):
            await buffer.write(None, adopted)  # type: ignore[arg-type]
        for part in buffer.split(adopted):
            await buffer.write(None, part)  # type: ignore[arg-type]
        assert buffer.duplicates == 0, "nothing before the commit"
        buffer.transaction_ended(committed=True)

    asyncio.run(flush())
    assert buffer.duplicates == (2 - 1) + (2 - 0), "per write that returned, in the transaction that committed"
    buffer.transaction_ended(committed=True)
    assert buffer.duplicates == 3, "counted once"


def test_a_full_worker_refuses_before_parsing_when_nothing_of_that_size_can_be_accepted() -> None:
    fd = os.memfd_create("events-journal")
    try:
        journal = JournalFile(fd, 4096, ("events",), lambda name: f"w/{name}").sections["events"]
        buffer = PendingEvents(max_pending=1000, flush_max=1000)
        buffer.journal = journal
        body = event(event_id=None, metadata={"pad": "x" * 600})
        statuses = []
        for i in range(40):  # 4 KiB regions: a handful of ~700-byte events, then the snapshot does not fit either
            record = orjson.dumps({**body, "user_id": f"u{i}"})
            identity, accepted = check_event({**body, "user_id": f"u{i}"}, CLOCK)
            statuses.append(buffer.add_one(identity, accepted, record).status)
        assert statuses[0] == 202 and statuses[-1] == 503, statuses
        size = len(record)  # the last one, refused
        # The journal's compaction failed: a body of that size is refused before it is parsed; a tiny one would fit.
        assert buffer.refuses(size, 1) and not buffer.backlog_full()
        assert buffer.refused_at is None, "the journal's refusals are not remembered: it makes room at the take"
        assert not buffer.refuses(1, 1)
        buffer.take()
        journal.take(1)
        assert not buffer.refuses(size, 1), "a take makes room again"
        # The pending bound: whatever the size.
        full = PendingEvents(max_pending=1, flush_max=1)
        identity, accepted = check_event(event(), CLOCK)
        assert full.add_one(identity, accepted, orjson.dumps(event())).status == 202
        assert full.refuses(1, 1) and full.backlog_full()
    finally:
        os.close(fd)


def test_a_refusal_by_the_bounds_is_remembered_while_something_is_held_and_forgotten_at_a_commit() -> None:
    buffer = PendingEvents(max_pending=10, flush_max=10)
    assert buffer.refuses(500, 11)
    assert buffer.refused_at is None, "nothing held: no commit would ever lift it"
    identity, accepted = check_event(event(), CLOCK)
    assert buffer.add_one(identity, accepted, orjson.dumps(event())).status == 202
    assert buffer.refuses(500, 10) and buffer.refused_at == (500, 10)
    assert buffer.refuses(300, 12) and buffer.refused_at == (500, 10), "not smaller in both: kept"
    assert buffer.refuses(300, 10) and buffer.refused_at == (300, 10)
    as_many = b"[" + b"{}," * 10 + b" " * 300
    assert buffer.refused_before_decoding(as_many)
    assert not buffer.refused_before_decoding(b"[" + b"{}," * 9 + b" " * 300), "fewer events: decoded and checked"
    assert not buffer.refused_before_decoding(as_many[:299]), "smaller: decoded and checked"
    buffer.take()
    assert buffer.refused_before_decoding(as_many), "taken is not committed: room comes back at the commit"
    buffer.acknowledge()
    assert buffer.refused_at is None and not buffer.refused_before_decoding(as_many)
