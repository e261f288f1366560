"""The flusher against the real PostgreSQL, in-process: lanes that do not wait for each other, rows PostgreSQL
refuses parked in the dead-letter table while the rest of their batch commits once, and statement timeouts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

from fastcount.features.base import FlushBuffer
from fastcount.features.increment import PendingCounts
from fastcount.observability.stats import WorkerStats
from fastcount.store import flusher as flusher_module
from fastcount.store.database import connect
from fastcount.store.flusher import Flusher

from conftest import Database

MAX_BIGINT = 2**63 - 1


class TableRows(FlushBuffer):
    """A second kind of buffer, as a feature other than increments would have: rows appended to its own table."""

    name = "rows"

    def __init__(self, table: str) -> None:
        super().__init__()
        self.table = table
        self.pending: list[str] = []

    def take(self) -> list[str] | None:
        if not self.pending:
            return None
        batch, self.pending = self.pending, []
        return batch

    def describe(self, batch: list[str]) -> tuple[int, int]:
        return len(batch), len(batch)

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: list[str]) -> int:
        await conn.execute(f"INSERT INTO {self.table} (item) SELECT unnest(%s::text[])", (batch,))  # type: ignore[arg-type]
        return len(batch)

    def split(self, batch: list[str]) -> list[list[str]]:
        middle = len(batch) // 2
        return [batch[:middle], batch[middle:]] if middle else [batch]

    def dead_letters(self, batch: list[str]) -> list[str]:
        return [json.dumps(item) for item in batch]

    def snapshot(self) -> bytes:
        return "\n".join(self.pending).encode()

    def replay(self, records: Sequence[bytes]) -> list[str]:
        return [line for record in records for line in record.decode().split("\n")]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def rows_table(database: Database, prefix: str) -> str:
    table = "test_rows_" + prefix.strip("-")
    database.query(f"CREATE TABLE {table} (item text NOT NULL)")
    return table


def test_a_stalled_lane_does_not_delay_another_lanes_flush(database: Database, prefix: str, rows_table: str) -> None:
    async def scenario() -> None:
        counts = PendingCounts(1000, 1000)
        rows = TableRows(rows_table)
        flusher = Flusher(database.dsn, [counts, rows], 0.1, f"test/{prefix}", WorkerStats(), flush_timeout=30)
        blocker = await psycopg.AsyncConnection.connect(database.dsn)
        await blocker.execute(f"LOCK TABLE {rows_table} IN ACCESS EXCLUSIVE MODE")  # rows' writes now wait
        flusher.start()
        try:
            rows.pending.append("held")

            async def rows_blocked() -> bool:  # its batch taken and its transaction waiting for the lock
                return flusher.lanes["rows"].in_flight is not None and bool(
                    database.query(
                        "SELECT 1 FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (rows_table,)
                    )
                )

            await wait_for(rows_blocked)
            counts.add_all([(prefix + "a", 5)], b'{"key":"x","value":5}')

            async def counted() -> bool:
                return database.counts(prefix) == {prefix + "a": 5}

            await wait_for(counted)
            assert flusher.lanes["rows"].in_flight is not None, "the other lane is still held by the lock"
        finally:
            await blocker.close()  # releases the lock

        async def rows_written() -> bool:
            return database.query(f"SELECT item FROM {rows_table}") == [("held",)]

        await wait_for(rows_written)
        await flusher.stop()

    run(scenario())


def test_rows_postgres_refuses_are_parked_and_the_rest_commits_once(database: Database, prefix: str) -> None:
    near_max = prefix + "near-max"
    database.query("INSERT INTO counters (key, value, updated_at) VALUES (%s, %s, now())", (near_max, MAX_BIGINT - 10))
    writer = f"test/{prefix}"

    async def scenario() -> WorkerStats:
        counts = PendingCounts(10_000, 10_000)
        stats = WorkerStats()
        flusher = Flusher(database.dsn, [counts], 0.1, writer, stats)
        batch = {f"{prefix}{i}": i + 1 for i in range(40)}
        batch[near_max] = 11  # past bigint once added: refused by PostgreSQL, not knowable at the request
        for key, value in batch.items():
            counts.add_all([(key, value)], b"{}")
        flusher.start()
        await flusher.stop()
        return stats

    stats = run(scenario())
    counts = database.counts(prefix)
    assert counts.pop(near_max) == MAX_BIGINT - 10, "the refused addition left the counter as it was"
    assert counts == {f"{prefix}{i}": i + 1 for i in range(40)}, "every other key of the batch committed"
    parked = database.query(
        "SELECT feature, item, sqlstate FROM fastcount_dead_letters WHERE writer LIKE %s", (writer + "%",)
    )
    assert parked == [("increment", json.dumps({"key": near_max, "value": 11}), "22003")]
    assert database.query("SELECT count(*) FROM fastcount_batches WHERE writer LIKE %s", (writer + "%",)) == [(1,)]
    assert stats.dead_letters == 11
    assert stats.flushes == 1
    assert stats.flushed_rows == 40, "rows written, the parked one not among them"


def test_text_postgres_cannot_hold_is_parked_even_from_a_replayed_journal(database: Database, prefix: str) -> None:
    # Requests with NUL are refused at the door; a journal written by an older version may still hold one.
    writer = f"test/{prefix}"

    async def scenario() -> None:
        counts = PendingCounts(10_000, 10_000)
        flusher = Flusher(database.dsn, [counts], 0.1, writer, WorkerStats())
        records = [
            json.dumps({"key": prefix + "ok", "value": 2}).encode(),
            b'{"key": "' + prefix.encode() + b'\\u0000", "value": 3}',
        ]
        flusher.adopt("increment", "dead/writer/" + prefix + "/increment", 1, records)
        flusher.start()
        await flusher.stop()

    run(scenario())
    assert database.counts(prefix) == {prefix + "ok": 2}
    items = database.query(
        "SELECT item FROM fastcount_dead_letters WHERE writer = %s", ("dead/writer/" + prefix + "/increment",)
    )
    assert items == [(json.dumps({"key": prefix + "\x00", "value": 3}),)]


def test_statement_timeout_turns_a_hung_flush_into_a_retry_that_counts_once(database: Database, prefix: str) -> None:
    async def scenario() -> WorkerStats:
        counts = PendingCounts(1000, 1000)
        stats = WorkerStats()
        flusher = Flusher(database.dsn, [counts], 0.1, f"test/{prefix}", stats, flush_timeout=1)
        key = prefix + "k"
        database.query("INSERT INTO counters (key, value, updated_at) VALUES (%s, 1, now())", (key,))
        blocker = await psycopg.AsyncConnection.connect(database.dsn)
        await blocker.execute("SELECT value FROM counters WHERE key = %s FOR UPDATE", (key,))  # row lock held
        counts.add_all([(key, 5)], b"{}")
        flusher.start()

        async def timed_out() -> bool:
            return stats.flush_errors >= 1

        await wait_for(timed_out)
        await blocker.rollback()
        await blocker.close()
        await flusher.stop()
        return stats

    stats = run(scenario())
    assert database.counts(prefix) == {prefix + "k": 6}
    assert stats.flush_retries >= 1


def test_a_refused_key_in_a_copy_sized_batch_leaves_every_other_total_exact(database: Database, prefix: str) -> None:
    # Bisection writes several parts in one transaction; each part of the COPY path must merge its own rows once.
    near_max = prefix + "near-max"
    database.query("INSERT INTO counters (key, value, updated_at) VALUES (%s, %s, now())", (near_max, MAX_BIGINT - 10))
    existing = {f"{prefix}{i:05d}": 1000 for i in range(0, 9000, 3)}
    database.query(
        "INSERT INTO counters (key, value, updated_at) SELECT unnest(%s::text[]), unnest(%s::bigint[]), now()",
        (list(existing), list(existing.values())),
    )
    batch = {f"{prefix}{i:05d}": i + 1 for i in range(9000)}  # halves and quarters still take the COPY path
    batch[near_max] = 11

    async def scenario() -> None:
        counts = PendingCounts(10_000, 10_000)
        flusher = Flusher(database.dsn, [counts], 0.1, f"test/{prefix}", WorkerStats())
        counts.add_all(list(batch.items()), b"{}")
        flusher.start()
        await flusher.stop()

    run(scenario())
    expected = {key: value + existing.get(key, 0) for key, value in batch.items()}
    expected[near_max] = MAX_BIGINT - 10
    assert database.counts(prefix) == expected


def test_a_bug_in_a_write_keeps_the_batch_and_retries_it_until_written_once(
    database: Database, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flusher_module, "RETRY_MAX_DELAY", 0.1)  # the crash back-off, shortened for the test

    class CrashingOnce(PendingCounts):
        crashes = 0

        async def write(self, conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> int:
            if not self.crashes:
                self.crashes += 1
                raise RuntimeError("a bug, not a database error")
            return await super().write(conn, batch)

    async def scenario() -> WorkerStats:
        counts = CrashingOnce(1000, 1000)
        stats = WorkerStats()
        flusher = Flusher(database.dsn, [counts], 0.05, f"test/{prefix}", stats)
        counts.add_all([(prefix + "a", 3), (prefix + "b", 4)], b"{}")
        flusher.start()

        async def written() -> bool:
            return database.counts(prefix) == {prefix + "a": 3, prefix + "b": 4}

        await wait_for(written)
        await flusher.stop()
        return stats

    stats = run(scenario())
    assert database.counts(prefix) == {prefix + "a": 3, prefix + "b": 4}
    assert (stats.flush_errors, stats.flushes) == (1, 1)


def test_a_flush_connection_bounds_its_statements_and_its_idle_transactions_on_the_server_side(
    database: Database,
) -> None:
    """A flush transaction whose client vanished without a FIN (a partition) must not sit idle in transaction for the
    kernel's default keepalive (2 hours), holding row locks and the rollups' lock (review)."""

    async def settings() -> list[str]:
        async with await connect(database.dsn, statement_timeout=2.5) as conn:
            names = ("statement_timeout", "idle_in_transaction_session_timeout", "tcp_keepalives_idle")
            return [str((await (await conn.execute(f"SHOW {name}")).fetchone() or [""])[0]) for name in names]

    assert asyncio.run(settings()) == ["2500ms", "2500ms", "10"]
