"""Large batches go to PostgreSQL in JSON parts of JSON_PART_KEYS keys (COPYed into a staging table, then merged):
the totals must be added to the counters already there, whether a batch is one part, exactly one, or many."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from fastcount.features.increment import JSON_PART_KEYS, PendingCounts
from fastcount.observability.stats import WorkerStats
from fastcount.store.flusher import Flusher

from conftest import Database, StartServer
from httpclient import request


def seed(database: Database, counts: dict[str, int]) -> None:
    """Counters that exist before the batch, written with COPY (fast even for 50,000 rows)."""
    statement = "COPY counters (key, value, updated_at) FROM STDIN"
    with psycopg.connect(database.dsn) as conn, conn.cursor() as cursor, cursor.copy(statement) as copy:
        for key, value in counts.items():
            copy.write_row((key, value, "2020-01-01T00:00:00Z"))


@pytest.mark.parametrize("keys", [JSON_PART_KEYS - 1, JSON_PART_KEYS, JSON_PART_KEYS + 1, 100_000])
def test_one_batch_of_many_keys_adds_to_existing_counters(database: Database, prefix: str, keys: int) -> None:
    existing = {f"{prefix}{i}": 1_000_000 + i for i in range(0, keys, 2)}  # every other key is already counted
    seed(database, existing)
    batch = {f"{prefix}{i}": i % 7 + 1 for i in range(keys)}
    writer = f"test/{prefix}"

    async def flush_once() -> WorkerStats:
        pending = PendingCounts(keys, keys)
        stats = WorkerStats()
        flusher = Flusher(database.dsn, [pending], 600, writer, stats)
        for key, value in batch.items():
            pending.pending[key] = value  # what many requests sum up to; validation is not under test here
        flusher.start()
        await flusher.stop()
        return stats

    stats = asyncio.run(flush_once())
    expected = {key: existing.get(key, 0) + value for key, value in batch.items()}
    assert database.counts(prefix) == expected
    assert (stats.flushes, stats.flushed_rows) == (1, keys), "one batch, one transaction"
    ledger = database.query("SELECT keys, total FROM fastcount_batches WHERE writer LIKE %s", (writer + "%",))
    assert ledger == [(keys, sum(batch.values()))]


def test_a_hundred_thousand_distinct_keys_over_http_are_added_exactly(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    keys = 100_000
    existing = {f"{prefix}{i}": 10**12 + i for i in range(0, keys, 3)}
    seed(database, existing)
    # Nothing is flushed before the stop: the stop writes all 100,000 keys as one batch (the COPY path).
    server = start_server(
        "--flush-interval", "600", "--flush-max-keys", str(keys + 1), "--max-body", str(1 << 20), workers=1
    )
    sent: dict[str, int] = {}
    for start in range(0, keys, 10_000):
        items = [{"key": f"{prefix}{i}", "value": i % 5 + 1} for i in range(start, start + 10_000)]
        assert request(server.port, "POST", "/increment", items)[0] == 202
        sent.update((str(item["key"]), int(item["value"])) for item in items)  # type: ignore[call-overload]
    assert database.counts(prefix) == existing, "nothing flushed before the stop"
    assert server.stop() == 0
    assert database.counts(prefix) == {key: existing.get(key, 0) + value for key, value in sent.items()}
