"""POST /increment and GET /counters/<key>: validate, add into this worker's pending counts, write them on flush.

Validation is pure (`parse_increments`) so it is tested without a server. The pending dict is bounded: past
--max-pending-keys (pending plus the batch being retried) a new key gets 503 + Retry-After, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from fastcount.server.responses import Response, constant_error, error_response, json_response
from fastcount.server.routing import Route
from fastcount.store.journal import Journal

MAX_VALUE = 2**53 - 1
MAX_KEY_BYTES = 256
MAX_ITEMS = 10_000
COPY_THRESHOLD = 2_000  # keys: below, one unnest() upsert is faster; above, COPY + merge (bench/flush_methods.py)

ACCEPTED = Response(202, cacheable=True)
OVERLOADED = constant_error(503, "too many pending keys; retry later", ((b"Retry-After", b"1"),))
COUNTER_NOT_FOUND = constant_error(404, "unknown key")
BAD_JSON = constant_error(400, "body must be JSON")
DATABASE_UNAVAILABLE = constant_error(503, "database unavailable", ((b"Retry-After", b"1"),))

UPSERT_FROM_ARRAYS = """
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, value, now() FROM unnest(%s::text[], %s::bigint[]) AS batch(key, value)
    ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
"""
CREATE_STAGING = """
    CREATE TEMP TABLE IF NOT EXISTS fastcount_increment_staging (key text NOT NULL, value bigint NOT NULL)
    ON COMMIT DELETE ROWS
"""
UPSERT_FROM_STAGING = """
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, value, now() FROM fastcount_increment_staging
    ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
"""
READ_COUNTER = "SELECT key, value, updated_at FROM counters WHERE key = %s"
SNAPSHOT_MARK = b"S"  # starts a journal record that sums up earlier ones; no JSON text starts with it


class InvalidIncrement(ValueError):
    pass


def _check_item(item: object, where: str) -> tuple[str, int]:
    if type(item) is not dict:
        raise InvalidIncrement(f"{where}must be an object with 'key' and 'value'")
    key = item.get("key")
    value = item.get("value")
    if type(key) is not str:
        raise InvalidIncrement(f"{where}'key' must be a string" if key is not None else f"{where}'key' is required")
    if not key or (len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES):
        raise InvalidIncrement(f"{where}'key' must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
    if type(value) is not int:  # bool is a subclass of int; `type` rejects it along with floats and strings
        raise InvalidIncrement(
            f"{where}'value' must be an integer" if value is not None else f"{where}'value' is required"
        )
    if not 1 <= value <= MAX_VALUE:
        raise InvalidIncrement(f"{where}'value' must be from 1 to {MAX_VALUE}")
    return key, value


def parse_increments(body: bytes, max_items: int | None = MAX_ITEMS) -> list[tuple[str, int]]:
    """The (key, value) pairs of a request body; raises InvalidIncrement naming the first problem."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidIncrement("body must be JSON") from None
    if type(document) is list:
        if not document:
            raise InvalidIncrement("array must hold at least one increment")
        if max_items is not None and len(document) > max_items:
            raise InvalidIncrement(f"array holds more than {max_items} increments")
        return [_check_item(item, f"item {index}: ") for index, item in enumerate(document)]
    return [_check_item(document, "")]


class PendingCounts:
    """This worker's counts not yet in PostgreSQL; the flusher swaps the dict out and writes it."""

    name = "increment"

    __slots__ = (
        "flush_max_keys",
        "journal",
        "max_pending_keys",
        "pending",
        "request_flush",
        "unacknowledged_keys",
    )

    def __init__(self, max_pending_keys: int, flush_max_keys: int, request_flush: Callable[[], None]) -> None:
        self.pending: dict[str, int] = {}
        self.unacknowledged_keys = 0
        self.max_pending_keys = max_pending_keys
        self.flush_max_keys = flush_max_keys
        self.request_flush = request_flush
        self.journal: Journal | None = None  # the crash journal: every accepted body, until its batch is committed

    def journal_full(self, body: bytes) -> bool:
        """The journal's region is full: sum it up into one record, then append. False if it still cannot hold it."""
        journal = self.journal
        assert journal is not None
        snapshot = SNAPSHOT_MARK + orjson.dumps(self.pending)
        if journal.compact(snapshot) and journal.append(body):
            return True
        self.request_flush()
        return False

    def add_all(self, items: list[tuple[str, int]], body: bytes) -> bool:
        """Add every item, or none when that would pass the bound."""
        pending = self.pending
        new_keys = sum(1 for key, _ in items if key not in pending)
        if new_keys and len(pending) + new_keys + self.unacknowledged_keys > self.max_pending_keys:
            return False
        journal = self.journal
        if journal is not None and not journal.append(body) and not self.journal_full(body):
            return False
        size_before = len(pending)
        for key, value in items:
            pending[key] = pending.get(key, 0) + value
        if size_before < self.flush_max_keys <= len(pending):
            self.request_flush()
        return True

    def backlog_keys(self) -> int:
        return len(self.pending) + self.unacknowledged_keys

    # -- FlushBuffer ------------------------------------------------------------------------------------------------

    def take(self, seq: int) -> dict[str, int] | None:
        if not self.pending:
            return None
        batch, self.pending = self.pending, {}
        self.unacknowledged_keys = len(batch)
        if self.journal is not None:
            self.journal.take(seq)
        return batch

    def acknowledge(self) -> None:
        self.unacknowledged_keys = 0
        if self.journal is not None:
            self.journal.acknowledge()

    @staticmethod
    def replay(records: list[bytes]) -> dict[str, int]:
        """The counts in a dead worker's journal records. A record cut short by the kill does not parse and is
        skipped: it was never answered."""
        counts: dict[str, int] = {}
        for record in records:
            if record.startswith(SNAPSHOT_MARK):
                items = list(orjson.loads(record[len(SNAPSHOT_MARK) :]).items())
            else:
                try:
                    items = parse_increments(record, max_items=None)
                except InvalidIncrement:
                    continue
            for key, value in items:
                counts[key] = counts.get(key, 0) + value
        return counts

    def describe(self, batch: dict[str, int]) -> tuple[int, int]:
        return len(batch), sum(batch.values())

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> int:
        if len(batch) < COPY_THRESHOLD:
            await upsert_with_unnest(conn, batch)
        else:
            await upsert_with_copy(conn, batch)
        return len(batch)


async def upsert_with_unnest(conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> None:
    await conn.execute(UPSERT_FROM_ARRAYS, (list(batch), list(batch.values())))


async def upsert_with_copy(conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> None:
    await conn.execute(CREATE_STAGING)
    async with conn.cursor().copy("COPY fastcount_increment_staging (key, value) FROM STDIN") as copy:
        for row in batch.items():
            await copy.write_row(row)
    await conn.execute(UPSERT_FROM_STAGING)


class IncrementFeature:
    def __init__(self, pending: PendingCounts, read_pool: AsyncConnectionPool[Any]) -> None:
        self.pending = pending
        self.read_pool = read_pool

    def routes(self) -> list[Route]:
        return [
            Route(b"POST", b"/increment", self.handle_increment, name="increment"),
            Route(b"GET", b"/counters/", self.handle_read_counter, prefix=True, name="read_counter"),
        ]

    def handle_increment(self, path: bytes, query: bytes, body: bytes) -> Response:
        # The common case, one small object, inline: this is the hot path.
        pending = self.pending
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return BAD_JSON
        if type(document) is dict:
            key = document.get("key")
            value = document.get("value")
            if (
                type(key) is str
                and type(value) is int
                and 0 < len(key) <= MAX_KEY_BYTES // 4
                and 1 <= value <= MAX_VALUE
            ):
                counts = pending.pending
                current = counts.get(key)
                if current is None and len(counts) + pending.unacknowledged_keys >= pending.max_pending_keys:
                    return OVERLOADED
                journal = pending.journal
                if journal is not None:  # journal before answering: a crash after the 202 loses nothing
                    end = journal.pos + len(body)
                    if end < journal.end:
                        journal.mm[journal.pos : end] = body
                        journal.pos = end + 1
                    elif not pending.journal_full(body):
                        return OVERLOADED
                if current is not None:
                    counts[key] = current + value
                    return ACCEPTED
                counts[key] = value
                if len(counts) == pending.flush_max_keys:
                    pending.request_flush()
                return ACCEPTED
        try:
            items = parse_increments(body)
        except InvalidIncrement as problem:
            return error_response(400, str(problem))
        return ACCEPTED if pending.add_all(items, body) else OVERLOADED

    async def handle_read_counter(self, path: bytes, query: bytes, body: bytes) -> Response:
        raw_key = unquote_to_bytes(path[len(b"/counters/") :])
        try:
            key = raw_key.decode()
        except UnicodeDecodeError:
            return error_response(400, "key must be UTF-8")
        if not key or len(raw_key) > MAX_KEY_BYTES:
            return error_response(400, f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
        try:
            async with self.read_pool.connection() as conn:
                row = await (await conn.execute(READ_COUNTER, (key,))).fetchone()
        except (psycopg.Error, OSError, TimeoutError):
            return DATABASE_UNAVAILABLE
        if row is None:
            return COUNTER_NOT_FOUND
        return json_response(200, {"key": row[0], "value": row[1], "updated_at": row[2].isoformat()})
