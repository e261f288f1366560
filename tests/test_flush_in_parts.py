"""A batch of an idempotent buffer larger than its bound is committed in parts, one transaction each, the ledger row
with the last (flusher.py, rule 6): exact totals and unique users, retries from the first part not committed,
counters and caches that learn only from committed transactions, a batch whose one transaction would pass
--flush-timeout, and a worker SIGKILLed between parts."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

import fastcount.store.flusher as flusher_module
from fastcount.features.base import FlushBuffer
from fastcount.features.events import PendingEvents
from fastcount.features.events.query import parse_query, run_query
from fastcount.features.events.validation import Clock, check_event
from fastcount.features.verve.accept import PendingIds
from fastcount.observability.stats import WorkerStats
from fastcount.store.flusher import Doubt, Flusher, InFlight

from conftest import Database, StartServer, wait_until
from events_support import expected, metrics
from test_flusher import TableRows

HOUR = 3600
DAY = 86400
CHANNELS = ("web", "api", "mobile_app")


def events_of(prefix: str, count: int, seed: int) -> list[dict[str, object]]:
    """`count` events over 30 hours and three channels; users grow along the list (each part brings new ones) and
    come back (so unique users are fewer than events in every group)."""
    rng = random.Random(seed)
    now = int(time.time())
    return [
        {"event_name": prefix + "view", "channel": rng.choice(CHANNELS),
         "user_id": f"{prefix}u{i // 5 - rng.randrange(3)}", "timestamp": now - 60 - rng.randrange(30 * HOUR),
         "event_id": f"{prefix}e{i}"}
        for i in range(count)
    ]  # fmt: skip


def accept(buffer: PendingEvents, events: list[dict[str, object]]) -> None:
    clock = Clock(int(time.time()), 5.0, 90 * DAY)
    for start in range(0, len(events), 500):
        chunk = events[start : start + 500]
        assert buffer.add_many([check_event(event, clock) for event in chunk], orjson.dumps(chunk)) is None


async def flush(buffer: FlushBuffer, database: Database, writer: str, drop_after_commits: int = 0) -> WorkerStats:
    stats = WorkerStats()
    flusher = Flusher(database.dsn, [buffer], 0.1, writer, stats)
    flusher.drop_after_commits = drop_after_commits
    flusher.start()
    await flusher.stop()  # flushes everything
    return stats


async def answers(database: Database, name: str, now: int) -> list[dict[str, object]]:
    """GET /metrics' answers (whole, by channel, by hour) from what PostgreSQL holds, as asked at `now` (one clock for
    the answers and `expected_answers`: two reads of it a second apart gave two different ranges)."""
    found = []
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        for group_by in ("", "&group_by=channel", "&group_by=hour"):
            query = f"event_name={name}&from={now - 2 * DAY}&to={now + 1}{group_by}".encode()
            found.append(await run_query(conn, parse_query(query, now)))
    return found


def expected_answers(events: list[dict[str, object]], name: str, now: int) -> list[dict[str, object]]:
    return [expected(events, name, now - 2 * DAY, now + 1, group_by=group) for group in ("", "channel", "hour")]


def transactions_of(database: Database, name: str) -> dict[str, str]:
    """event_id -> the transaction (xmin) that inserted its row."""
    rows = database.query("SELECT event_id, xmin::text FROM events WHERE event_name = %s", (name,))
    return {str(event_id): str(xmin) for event_id, xmin in rows}


def test_a_batch_past_the_bound_commits_in_parts_with_exact_totals_users_and_one_ledger_row(
    database: Database, prefix: str
) -> None:
    name = prefix + "view"
    now = int(time.time())
    events = events_of(prefix, 1200, seed=1)
    stored_before = events[::20]  # 60 of them, one in each part: stored by another worker first

    async def scenario() -> tuple[PendingEvents, WorkerStats, list[dict[str, object]]]:
        other = PendingEvents(max_pending=10_000, flush_max=10_000)
        accept(other, stored_before)
        await flush(other, database, f"other/{prefix}")
        buffer = PendingEvents(max_pending=10_000, flush_max=50)  # parts of at most twice that
        accept(buffer, events)
        stats = await flush(buffer, database, f"test/{prefix}")
        return buffer, stats, await answers(database, name, now)

    buffer, stats, found = asyncio.run(scenario())
    assert found == expected_answers(events, name, now)
    assert found[0]["total_events"] == 1200 and found[0]["unique_users"] < 300  # type: ignore[operator]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name = %s", (name,)) == [(1200,)]
    transactions = transactions_of(database, name)
    assert len(transactions) == 1200
    mine = {xmin for event_id, xmin in transactions.items() if int(event_id.rsplit("e", 1)[1]) % 20}
    assert len(mine) == 12, "1,200 events in parts of at most 100: twelve transactions"
    ledger = database.query(
        "SELECT seq, xmin::text FROM fastcount_batches WHERE writer = %s", (f"test/{prefix}/events",)
    )
    assert ledger == [(1, transactions[f"{prefix}e1199"])], "one ledger row, committed with the last part"
    assert transactions[f"{prefix}e1"] != transactions[f"{prefix}e1199"]
    assert buffer.duplicates == 60, "the events another worker had stored"
    assert (stats.flushes, stats.flushed_rows, stats.flush_errors) == (1, 1140, 0)


def test_events_postgresql_refuses_are_parked_alone_and_the_rollups_stay_exact(database: Database, prefix: str) -> None:
    """The bisection of a refused batch writes several halves in one transaction, under savepoints: each write must
    start from empty staging tables, or a half would insert (and count in the rollups) rows of another."""
    name = prefix + "view"
    now = int(time.time())
    events = events_of(prefix, 400, seed=3)
    # Events PostgreSQL refuses (as if validation had let them through): a NUL in a string, in metadata, and tags
    # that are not an array. Same name and hours as the others, so a mistake would show in their rollups.
    poisons = [{"user_id": "bad\x00user"}, {"metadata": {"k": "v\x00"}}, {"tags": "not-an-array"}]

    async def scenario() -> tuple[PendingEvents, WorkerStats, list[dict[str, object]]]:
        other = PendingEvents(max_pending=10_000, flush_max=10_000)
        accept(other, events[:150])  # stored first: duplicates in the refused batch
        await flush(other, database, f"other/{prefix}")
        buffer = PendingEvents(max_pending=10_000, flush_max=10_000)
        accept(buffer, events)
        for number, poison in enumerate(poisons):
            event = {**events[100 * number + 50], "event_id": f"{prefix}poison{number}", **poison}
            buffer.pending[(int(event["timestamp"]) // DAY, bytes([number + 1]) * 16)] = event  # type: ignore[call-overload]
        stats = await flush(buffer, database, f"test/{prefix}")
        return buffer, stats, await answers(database, name, now)

    buffer, stats, found = asyncio.run(scenario())
    assert found == expected_answers(events, name, now)
    assert database.query("SELECT count(*) FROM events WHERE event_name = %s", (name,)) == [(400,)]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name = %s", (name,)) == [(400,)]
    parked = database.query(
        "SELECT item FROM fastcount_dead_letters WHERE writer = %s ORDER BY item", (f"test/{prefix}/events",)
    )
    assert sorted(orjson.loads(str(item))["event_id"] for (item,) in parked) == [f"{prefix}poison{n}" for n in range(3)]
    assert stats.dead_letters == 3
    assert buffer.duplicates == 150


class RolledBackOnce(PendingEvents):
    """Events whose `fail_at`-th write raises after writing (events inserted, users numbered): its transaction rolls
    back."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(max_pending=10_000, flush_max=50)  # parts of at most 100
        self.fail_at = fail_at
        self.writes = 0

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: Any) -> int:
        inserted = await super().write(conn, batch)
        self.writes += 1
        if self.writes == self.fail_at:
            raise psycopg.OperationalError("injected: connection lost before COMMIT")
        return inserted


def test_failures_between_and_within_parts_resume_and_count_duplicates_as_committed(
    database: Database, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = prefix + "view"
    now = int(time.time())
    events = events_of(prefix, 600, seed=2)
    stored_before = events[::10]  # 60, spread over the six parts

    async def scenario() -> tuple[RolledBackOnce, WorkerStats, list[dict[str, object]]]:
        other = PendingEvents(max_pending=10_000, flush_max=10_000)
        accept(other, stored_before)
        await flush(other, database, f"other/{prefix}")
        # Part 1 commits and its connection drops (the lane cannot know it committed); part 3's first attempt gives
        # user numbers, then fails before COMMIT.
        buffer = RolledBackOnce(fail_at=3)
        accept(buffer, events)
        stats = await flush(buffer, database, f"test/{prefix}", drop_after_commits=1)
        return buffer, stats, await answers(database, name, now)

    buffer, stats, found = asyncio.run(scenario())
    assert buffer.duplicates == 60, "the events stored before, and nothing of part 1 (it had committed)"
    assert found == expected_answers(events, name, now)
    assert database.query("SELECT count(*), count(DISTINCT id) FROM events WHERE event_name = %s", (name,)) == [
        (600, 600)
    ]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name = %s", (name,)) == [(600,)]
    assert len(set(transactions_of(database, name).values())) == 7, "six parts, and the events stored before"
    assert database.query("SELECT count(*) FROM fastcount_batches WHERE writer = %s", (f"test/{prefix}/events",)) == [
        (1,)
    ]
    assert "event=part_already_committed" in caplog.text, "part 1's outcome was found out, not guessed"
    assert stats.flush_errors == 2


class IdempotentRows(TableRows):
    """Items of a table keyed by them, in parts of `transaction_rows`; its one INSERT statement sleeps `sleep`
    seconds a row in PostgreSQL."""

    idempotent = True

    def __init__(self, table: str, transaction_rows: int, sleep: float = 0.0) -> None:
        super().__init__(table)
        self.transaction_rows = transaction_rows
        self.sleep = sleep
        self.writes = 0
        self.ended: list[bool] = []  # transaction_ended's calls

    def transaction_ended(self, committed: bool) -> None:
        self.ended.append(committed)

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: list[str]) -> int:
        self.writes += 1
        cursor = await conn.execute(
            f"INSERT INTO {self.table} (item) SELECT item FROM unnest(%s::text[]) AS item"
            " WHERE pg_sleep(%s)::text = '' ORDER BY item ON CONFLICT DO NOTHING",
            (batch, self.sleep),
        )
        return cursor.rowcount

    def parts(self, batch: list[str], rows: int) -> Iterator[list[str]]:
        for start in range(0, len(batch), rows):
            yield batch[start : start + rows]


def test_a_batch_whose_one_transaction_would_pass_the_flush_timeout_commits_in_parts(
    database: Database, prefix: str
) -> None:
    table = "test_slow_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")
    items = [f"{prefix}{i:03d}" for i in range(300)]

    async def scenario() -> None:
        # 10 ms a row in one INSERT: the whole batch would be one statement of 3 s, past a 1 s --flush-timeout; its
        # parts of 10 rows take 0.1 s each.
        buffer = IdempotentRows(table, transaction_rows=10, sleep=0.01)
        buffer.pending = list(items)
        flusher = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", WorkerStats(), flush_timeout=1)
        lane = flusher.lanes["rows"]
        deadline = time.monotonic() + 120  # only bounds a broken run: the whole batch times out again and again
        try:
            while (await lane.flush_once())[1] or lane.in_flight is not None:
                assert time.monotonic() < deadline, "the batch never committed"
        finally:
            await lane._close()

    asyncio.run(scenario())
    rows = database.query(f"SELECT item, xmin::text FROM {table}")
    assert sorted(str(item) for item, _ in rows) == items
    assert len({xmin for _, xmin in rows}) == 30
    assert database.query("SELECT count(*) FROM fastcount_batches WHERE writer = %s", (f"test/{prefix}/rows",)) == [
        (1,)
    ]


class SlowWhole(TableRows):
    """A batch that must be one transaction (not idempotent), of `rows` rows as the ledger counts them, whose write
    first works `idle` seconds in Python (the transaction open, idle in PostgreSQL), then `seconds` in PostgreSQL."""

    def __init__(self, table: str, rows: int, seconds: float, idle: float) -> None:
        super().__init__(table)
        self.rows = rows
        self.seconds = seconds
        self.idle = idle

    def describe(self, batch: list[str]) -> tuple[int, int]:
        return self.rows, len(batch)

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: list[str]) -> int:
        await asyncio.sleep(self.idle)
        await conn.execute("SELECT pg_sleep(%s)", (self.seconds,))
        return await super().write(conn, batch)


def test_a_batch_that_must_be_one_transaction_gets_the_time_its_size_needs(database: Database, prefix: str) -> None:
    """Review: with --flush-timeout 3 a backlog of 1M increment keys (4-7 s to merge here) timed out on every attempt,
    forever. A batch of 100,000 rows may take 2 s however short the flush timeout, in a statement or between two (a
    refused batch's bisection sorts in Python between them); the connection keeps its own timeouts."""
    table = "test_whole_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text NOT NULL)")

    async def scenario() -> tuple[WorkerStats, list[str]]:
        buffer = SlowWhole(table, rows=100_000, seconds=1.5, idle=1.5)
        buffer.pending = ["a", "b"]
        stats = WorkerStats()
        lane = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", stats, flush_timeout=1).lanes["rows"]
        try:
            assert await lane.flush_once() == (True, True), "committed on its first attempt"
            assert lane.conn is not None
            row = await (
                await lane.conn.execute(
                    "SELECT current_setting('statement_timeout'),"
                    " current_setting('idle_in_transaction_session_timeout')"
                )
            ).fetchone()
        finally:
            await lane._close()
        assert row is not None
        return stats, [str(value) for value in row]

    stats, timeouts = asyncio.run(scenario())
    assert stats.flush_errors == 0
    assert timeouts == ["1s", "1s"], "the longer timeouts were this transaction's only"
    assert sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}")) == ["a", "b"]


def test_sigkill_between_parts_of_a_batch_loses_nothing_and_doubles_nothing(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    name = prefix + "view"
    events = events_of(prefix, 200, seed=3)
    # One worker, one bulk of 200 events: one batch, four parts of 50 (at most twice --events-flush-max, in the
    # array's order). A row of the 131st event's key, inserted and not committed by the test, holds part 3 inside its
    # INSERT.
    server = start_server("--flush-interval", "600", "--events-flush-max", "25")
    held_identity, held = check_event(events[130], Clock(int(time.time()), 5.0, 90 * DAY))
    day = int(held["timestamp"]) // DAY
    database.query("SELECT fastcount_events_partition(date '1970-01-01' + %s)", (day,))
    with psycopg.connect(database.dsn) as blocker:
        blocker.execute(
            "INSERT INTO events (day, id, ts, event_name, channel, user_id)"
            " VALUES (date '1970-01-01' + %s, %s, to_timestamp(%s), %s, 'web', 'nobody')",
            (day, uuid.UUID(bytes=held_identity), held["timestamp"], name),
        )
        row = blocker.execute("SELECT txid_current() % (2^32)::bigint").fetchone()
        assert row is not None
        blocker_xid = int(row[0])
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/events", body=json.dumps(events).encode())
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (202, {"accepted": 200, "rejected": []})
        conn.close()
        server.wait_for_log(r"event=flush_in_parts .* rows=200 parts=4")

        def held_in_part_3() -> bool:
            waiting = database.query(
                "SELECT 1 FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
                " AND transactionid::text::bigint = %s",
                (blocker_xid,),
            )
            return bool(waiting) and len(transactions_of(database, name)) == 100

        wait_until(held_in_part_3, "parts 1 and 2 committed, part 3 waits")
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        blocker.rollback()
    server.wait_for_log(r"event=journals_recovered", timeout=90)  # once the killed worker's backend gave up
    recovered = re.search(r"event=journal_recovered writer=(\S+/events) seq=(\d+) rows=200", server.log)
    assert recovered, server.log
    assert server.stop() == 0
    transactions = transactions_of(database, name)
    assert len(transactions) == 200
    assert database.query("SELECT count(*) FROM events WHERE event_name = %s AND user_id = 'nobody'", (name,)) == [(0,)]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name = %s", (name,)) == [(200,)]
    assert database.query(
        "SELECT count(*) FROM fastcount_batches WHERE writer = %s AND seq = %s", (recovered[1], int(recovered[2]))
    ) == [(1,)]
    reader = start_server()
    now = int(time.time())
    for group_by in ("", "channel", "hour"):
        params: dict[str, object] = {"event_name": name, "from": now - 2 * DAY, "to": now + 1}
        if group_by:
            params["group_by"] = group_by
        assert metrics(reader.port, **params) == expected(events, name, now - 2 * DAY, now + 1, group_by=group_by)


def test_verve_ids_and_endpoints_past_the_bound_commit_in_parts_each_once(database: Database, prefix: str) -> None:
    # Windows of a day, years ago (ids of this test alone); ids come back across windows and within one.
    window = (int(time.time()) // DAY - 2000 - random.Random(prefix).randrange(10_000)) * DAY
    ids = PendingIds(DAY, 10_000, 10, flush_max_keys=20)
    assert ids.transaction_rows == 40, "twice the early flush's trigger"
    sent: dict[int, set[int]] = {}
    endpoints: dict[int, set[str]] = {}
    for i in range(250):
        start = window + (i // 100) * DAY
        ident, endpoint = i % 170, (f"http://{prefix}.example/{i % 4}" if i % 50 == 0 else None)
        assert ids.add(ident, endpoint, start + 1).status == 200
        sent.setdefault(start, set()).add(ident)
        if endpoint:
            endpoints.setdefault(start, set()).add(endpoint)
    batch = ({w: list(values) for w, values in ids.pending_ids.items()}, dict(ids.pending_endpoints))
    rows, _ = ids.describe(batch)
    parts = list(ids.parts(batch, 40))
    assert len(parts) == -(-rows // 40) and all(ids.describe(part)[0] <= 40 for part in parts)
    flushed = {(w, i) for part in parts for w, values in part[0].items() for i in values}
    assert flushed == {(w, i) for w, values in batch[0].items() for i in values}

    asyncio.run(flush(ids, database, f"test/{prefix}"))
    stored = database.query(
        "SELECT window_start, id, xmin::text FROM verve_ids WHERE window_start BETWEEN %s AND %s",
        (window, window + 2 * DAY),
    )
    assert {(int(w), int(i)) for w, i, _ in stored} == {(w, i) for w, values in sent.items() for i in values}  # type: ignore[call-overload]
    assert len({xmin for _, _, xmin in stored}) == len(parts)
    stored_endpoints = database.query(
        "SELECT window_start, endpoint FROM verve_endpoints WHERE window_start BETWEEN %s AND %s",
        (window, window + 2 * DAY),
    )
    assert {(int(w), str(e)) for w, e in stored_endpoints} == {  # type: ignore[call-overload]
        (w, e) for w, values in endpoints.items() for e in values
    }
    assert database.query("SELECT count(*) FROM fastcount_batches WHERE writer = %s", (f"test/{prefix}/verve",)) == [
        (1,)
    ]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_part_in_doubt_is_settled_by_its_ledger_key_and_never_guessed_while_it_runs(
    database: Database, prefix: str, outcome: str
) -> None:
    # The first part's attempt "got no answer to its COMMIT": its transaction is the test's, still open, holding its
    # part's ledger key and items a and b. While it runs the lane does not guess (its insert of the same key waits,
    # past the statement timeout); then it follows the outcome.
    table = "test_doubt_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")
    items = ["a", "b", "c", "d"]

    async def scenario() -> None:
        buffer = IdempotentRows(table, transaction_rows=2)
        flusher = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", WorkerStats(), flush_timeout=1)
        lane = flusher.lanes["rows"]
        attempt = await psycopg.AsyncConnection.connect(database.dsn)
        try:
            await attempt.execute(
                "INSERT INTO fastcount_parts (writer, seq, cut, part) VALUES (%s, 1, 'cut1', 0)", (lane.writer,)
            )
            await attempt.execute(f"INSERT INTO {table} (item) VALUES ('a'), ('b')")
            row = await (await attempt.execute("SELECT txid_current()")).fetchone()
            assert row is not None
            in_flight = InFlight(lane.writer, 1, items, 4, 4, parts=[["a", "b"], ["c", "d"]], cut="cut1")
            in_flight.doubt = Doubt(2, 0)
            assert not await lane._write(in_flight), "its transaction is still in progress"
            assert (in_flight.committed_parts, in_flight.doubt is not None) == (0, True)
            await (attempt.commit() if outcome == "commit" else attempt.rollback())
            assert await lane._write(in_flight)
        finally:
            await attempt.close()
            await lane._close()
        writers = dict(database.query(f"SELECT item, xmin::text FROM {table}"))
        assert sorted(writers) == items
        first_part_by_attempt = writers["a"] == writers["b"] == str(row[0])
        assert first_part_by_attempt == (outcome == "commit"), "written again only when the attempt rolled back"
        ledger = database.query("SELECT xmin::text FROM fastcount_batches WHERE writer = %s", (lane.writer,))
        assert ledger == [(writers["c"],)]
        assert database.query("SELECT count(*) FROM fastcount_parts WHERE writer = %s", (lane.writer,)) == [(0,)], (
            "the last part removes the parts' keys"
        )
        # What the attempt derived counts once if it committed, never if not; the timed-out wait settled nothing.
        assert buffer.ended == ([True, True] if outcome == "commit" else [False, True, True])

    asyncio.run(scenario())


def test_a_part_in_doubt_whose_key_the_database_does_not_hold_is_written_again(database: Database, prefix: str) -> None:
    """Review: an attempt whose COMMIT got no answer, on a primary that then failed over to a replica that never
    received it. Settled by a transaction id, the new primary could call it committed (it may have given the same id to
    a transaction of its own since) and the part's items were lost. Nothing reads transaction ids now (so this test
    cannot replay that reuse): the attempt's ledger key went with the failover, so the part is written again, and what
    the attempt derived is forgotten."""
    table = "test_lost_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")

    async def scenario() -> tuple[IdempotentRows, InFlight, bool]:
        buffer = IdempotentRows(table, transaction_rows=2)
        lane = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", WorkerStats(), flush_timeout=1).lanes["rows"]
        in_flight = InFlight(lane.writer, 1, None, 4, 4, parts=[["a", "b"], ["c", "d"]], cut="cut1")
        in_flight.doubt = Doubt(2, 0)  # what the lost attempt wrote
        try:
            return buffer, in_flight, await lane._write(in_flight)
        finally:
            await lane._close()

    buffer, in_flight, written = asyncio.run(scenario())
    assert written and in_flight.committed_parts == 2
    assert sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}")) == ["a", "b", "c", "d"]
    assert buffer.ended == [False, True, True], (
        "the lost attempt's transaction counted as rolled back, then two commits"
    )


class DiesAt(IdempotentRows):
    """Rows in parts of two; the worker "dies" (its write fails) at the part holding `fatal`."""

    def __init__(self, table: str, fatal: str) -> None:
        super().__init__(table, 2)
        self.fatal = fatal

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: list[str]) -> int:
        if self.fatal in batch:
            raise psycopg.OperationalError("injected: the worker died")
        return await super().write(conn, batch)


async def dies_then_adopted(
    database: Database, prefix: str, table: str, seq: int, items: list[str], replayed: bytes
) -> tuple[str, list[str]]:
    """A worker writes batch `seq` of `items` in parts of two and dies at the second (its first part committed);
    another flusher adopts the batch as its journal replays it (`replayed`: the items, one a line) and writes it.
    Returns the dead worker's writer and what the table held when it died."""
    dying = Flusher(database.dsn, [DiesAt(table, items[2])], 0.1, f"dead/{prefix}", WorkerStats()).lanes["rows"]
    try:
        assert not await dying._write(InFlight(dying.writer, seq, items, len(items), len(items)))
    finally:
        await dying._close()
    stored = sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}"))
    flusher = Flusher(database.dsn, [IdempotentRows(table, 2)], 0.1, f"test/{prefix}", WorkerStats())
    flusher.adopt("rows", dying.writer, seq, [replayed])
    try:
        assert (await flusher.lanes["rows"].flush_once())[0]
    finally:
        await flusher.lanes["rows"]._close()
    return dying.writer, stored


def test_a_recovered_batch_is_cut_again_and_a_dead_workers_part_keys_do_not_skip_its_parts(
    database: Database, prefix: str
) -> None:
    """A worker commits the first part of its batch (as it cut it: b and c) and dies before the second. Replayed from
    its journal, the batch is cut again in another order (a and b first): the adopter's first part is not the dead
    worker's, so the dead worker's key says nothing about it. Keys by part number alone would have skipped a."""
    table = "test_recut_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")

    dead, stored = asyncio.run(dies_then_adopted(database, prefix, table, 7, ["b", "c", "a", "d"], b"a\nb\nc\nd"))
    assert stored == ["b", "c"], "its first part"
    assert sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}")) == ["a", "b", "c", "d"]
    assert database.query("SELECT count(*) FROM fastcount_batches WHERE writer = %s AND seq = 7", (dead,)) == [(1,)]
    assert database.query("SELECT count(*) FROM fastcount_parts WHERE writer = %s", (dead,)) == [(0,)]


def committed_by_a_dead_worker(database: Database, table: str, seq: int, items: str) -> tuple[str, str]:
    """A table of `items` (one letter each) and the ledger row of the dead worker's batch `seq` that wrote them."""
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")
    dead = f"dead/{table}/rows"
    database.query(f"INSERT INTO {table} (item) SELECT unnest(%s::text[])", (list(items),))
    database.query(
        "INSERT INTO fastcount_batches (writer, seq, keys, total) VALUES (%s, %s, %s, %s)",
        (dead, seq, len(items), len(items)),
    )
    return table, dead


def test_a_recovered_part_in_doubt_is_settled_before_the_ledger_row_can_skip_it(
    database: Database, prefix: str
) -> None:
    """The adopter's first part is in doubt (its attempt rolled back, no key), and the batch's ledger row is there
    (the dead worker's own session committed everything before it died). Skipping to the last part would count the
    rolled-back attempt's derived state as committed: the doubt is settled first, by the part's key."""
    table, dead = committed_by_a_dead_worker(database, "test_doubt_adopted_" + prefix.strip("-"), 5, "abcd")

    async def scenario() -> IdempotentRows:
        buffer = IdempotentRows(table, 2)
        lane = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", WorkerStats()).lanes["rows"]
        in_flight = InFlight(dead, 5, None, 4, 4, parts=[["a", "b"], ["c", "d"]], cut="cut1")
        in_flight.doubt = Doubt(2, 0)
        try:
            assert await lane._write(in_flight)
        finally:
            await lane._close()
        return buffer

    buffer = asyncio.run(scenario())
    assert buffer.ended == [False, True, True], "the attempt in doubt forgotten, part 1 written again, part 2 settled"
    assert database.query(f"SELECT count(*) FROM {table}") == [(4,)]


def test_a_recovered_batch_the_dead_worker_committed_whole_is_not_written_again_part_by_part(
    database: Database, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: the dead worker committed every part and the ledger row, and died before its journal learnt it. Its
    replayed batch was written again, part after part (stored nothing twice, but 1.4M events took minutes and counted
    each as a duplicate dropped), until the last part met the ledger row."""
    table, dead = committed_by_a_dead_worker(database, "test_whole_again_" + prefix.strip("-"), 3, "abcde")

    async def scenario() -> IdempotentRows:
        buffer = IdempotentRows(table, 2)
        flusher = Flusher(database.dsn, [buffer], 0.1, f"test/{prefix}", WorkerStats())
        flusher.adopt("rows", dead, 3, [b"a\nb\nc\nd\ne"])
        try:
            assert (await flusher.lanes["rows"].flush_once())[0]
        finally:
            await flusher.lanes["rows"]._close()
        return buffer

    buffer = asyncio.run(scenario())
    assert buffer.writes == 0, "no part written again"
    assert "event=recovered_batch_committed_whole" in caplog.text
    assert "event=batch_already_committed" in caplog.text
    assert database.query(f"SELECT count(*) FROM {table}") == [(5,)]


def test_a_batch_cut_in_parts_is_not_kept_whole_beside_them(database: Database, prefix: str) -> None:
    """Memory: 1.4M events held twice, as the batch and as its parts, was ~70 MB no bound counted (review)."""
    table = "test_whole_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY)")

    async def scenario() -> InFlight:
        lane = Flusher(database.dsn, [IdempotentRows(table, 2)], 0.1, f"test/{prefix}", WorkerStats()).lanes["rows"]
        in_flight = InFlight(lane.writer, 1, ["a", "b", "c"], 3, 3)
        try:
            assert await lane._write(in_flight)
        finally:
            await lane._close()
        return in_flight

    in_flight = asyncio.run(scenario())
    assert (in_flight.batch, in_flight.parts) == (None, [["a", "b"], ["c"]])
    assert sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}")) == ["a", "b", "c"]


def test_an_item_refused_again_when_its_batch_is_written_again_is_parked_once(database: Database, prefix: str) -> None:
    """A worker parks `bad1` with its first part and dies before the second; its batch, replayed and cut again,
    refuses `bad1` again: it stays one dead letter (a second would count one refused item twice)."""
    table = "test_parked_once_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text PRIMARY KEY CHECK (item NOT LIKE 'bad%%'))")

    dead, stored = asyncio.run(
        dies_then_adopted(database, prefix, table, 3, ["a", "bad1", "b", "bad2"], b"bad1\nbad2\na\nb")
    )
    assert stored == ["a"], "its first part, bad1 parked"
    assert sorted(str(item) for (item,) in database.query(f"SELECT item FROM {table}")) == ["a", "b"]
    parked = database.query("SELECT item FROM fastcount_dead_letters WHERE writer = %s ORDER BY item", (dead,))
    assert [json.loads(str(item)) for (item,) in parked] == ["bad1", "bad2"]


class SlowRefusals(TableRows):
    """Rows of a table that refuses every item starting with 'bad'; a write takes `seconds` plus `per_item` seconds
    per item in PostgreSQL."""

    def __init__(self, table: str, seconds: float, per_item: float) -> None:
        super().__init__(table)
        self.seconds = seconds
        self.per_item = per_item

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: list[str]) -> int:
        await conn.execute("SELECT pg_sleep(%s)", (self.seconds + self.per_item * len(batch),))
        return await super().write(conn, batch)


def flush_refusals(
    database: Database, table: str, items: list[str], flush_timeout: float, seconds: float = 0.0, per_item: float = 0.0
) -> tuple[tuple[bool, bool], WorkerStats]:
    """One flush pass of `items` into a new table that refuses the 'bad' ones: (flush_once's answer, the stats)."""
    database.query(f"CREATE TABLE {table} (item text NOT NULL CHECK (item NOT LIKE 'bad%%'))")

    async def scenario() -> tuple[tuple[bool, bool], WorkerStats]:
        buffer = SlowRefusals(table, seconds, per_item)
        buffer.pending = list(items)
        stats = WorkerStats()
        lane = Flusher(database.dsn, [buffer], 0.1, f"test/{table}", stats, flush_timeout=flush_timeout).lanes["rows"]
        try:
            return await lane.flush_once(), stats
        finally:
            await lane._close()

    return asyncio.run(scenario())


def test_a_bisection_longer_than_the_backstop_commits_while_it_makes_progress(database: Database, prefix: str) -> None:
    """Review: the asyncio backstop bounded a whole attempt, and a bisection of many refused items makes about two
    statements per item, each within the statement timeout: past the backstop it was cancelled and retried, forever.
    Here ~250 statements of 30 ms (~8 s) against a backstop of 5.8 s (4 statement timeouts of 0.2 s + 5)."""
    table = "test_slow_refusals_" + prefix.strip("-")
    items = [f"bad{i:03d}" for i in range(128)] + ["good"]
    result, stats = flush_refusals(database, table, items, flush_timeout=0.2, seconds=0.03)
    assert result == (True, True), "committed on its first attempt"
    assert (stats.flush_errors, stats.dead_letters) == (0, 128)
    assert database.query(f"SELECT item FROM {table}") == [("good",)]


def test_the_way_down_a_bisection_counts_as_progress(
    database: Database, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: pushed back only once a half was written or parked, the backstop (then one timeout plus the margin)
    fired on the way down: the batch's first transaction, then its whole part again and each refused half, every
    statement within the timeout. With the margin at 0.5 s and 8 items of 0.1 s: 2.3 s of statements before the first
    leaf, against a backstop of 1.5 s."""
    monkeypatch.setattr(flusher_module, "BACKSTOP_MARGIN", 0.5)
    table = "test_way_down_" + prefix.strip("-")
    items = ["bad0"] + [f"good{i}" for i in range(7)]
    result, stats = flush_refusals(database, table, items, flush_timeout=1, per_item=0.1)
    assert result == (True, True), "committed on its first attempt"
    assert (stats.flush_errors, stats.dead_letters) == (0, 1)
    assert database.query(f"SELECT count(*) FROM {table}") == [(7,)]
