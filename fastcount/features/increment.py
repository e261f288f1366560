"""POST /increment and GET /counters/<key>: validate, add into this worker's pending counts, write them on flush.

Validation is pure (`parse_increments`) so it is tested without a server. The pending dict is bounded: past
--max-pending-keys (pending plus the batch being retried) a new key gets 503 + Retry-After, never a silent drop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from itertools import islice
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
import psycopg

from fastcount.features.base import Feature, FeatureContext, FeatureMetric, FlushBuffer
from fastcount.server.responses import Response, constant_error, error_response, json_problem, json_response
from fastcount.server.routing import Route
from fastcount.store.database import COPY_JSON_LINES

log = logging.getLogger(__name__)

MAX_VALUE = 2**53 - 1
MAX_TOTAL = 2**63 - 1  # a counter is a bigint: a pending sum past this could never be stored
MAX_KEY_BYTES = 256
MAX_KEY_CHARS_ANY_UTF8 = MAX_KEY_BYTES // 4  # a key of at most this many characters fits whatever they are
MAX_ITEMS = 10_000
# A batch travels as JSON objects of this many keys each, serialised by orjson (C) and copied into a staging table
# one at a time with the event loop given back between them: a part holds the loop ~0.3 ms (bench/loop_stalls.py),
# where per-row COPY formatting held it 4-5 ms for 10,000 keys, an unnest() of Python lists 2-12 ms, and one JSON
# parameter of 50,000 keys ~1.5-2 ms in the send alone.
JSON_PART_KEYS = 2_000

ACCEPTED = Response(202, cacheable=True)
OVERLOADED = constant_error(503, "too many pending keys; retry later", ((b"Retry-After", b"1"),))
COUNTER_NOT_FOUND = constant_error(404, "unknown key")
TOTAL_TOO_LARGE = constant_error(400, f"the key's total would pass {MAX_TOTAL}, the largest a counter holds")
DATABASE_UNAVAILABLE = constant_error(503, "database unavailable", ((b"Retry-After", b"1"),))

SCHEMA = [
    # fillfactor 70 leaves room on each page so most updates are HOT (measured: 0.9% -> 76%, ~105k -> ~170k rows/s).
    """
    CREATE TABLE IF NOT EXISTS counters (
        key text PRIMARY KEY,
        value bigint NOT NULL,
        updated_at timestamptz NOT NULL
    ) WITH (fillfactor = 70)
    """,
]
CREATE_PARTS = """
    CREATE TEMP TABLE IF NOT EXISTS fastcount_increment_parts (part json NOT NULL) ON COMMIT DELETE ROWS
"""
COPY_PARTS = f"COPY fastcount_increment_parts (part) FROM STDIN {COPY_JSON_LINES}"
# The parts are deleted as they are merged: under the savepoints of a refused batch's bisection, one transaction
# writes several halves, and each must merge only its own parts (ON COMMIT DELETE ROWS comes too late for that).
UPSERT_FROM_PARTS = """
    WITH parts AS (DELETE FROM fastcount_increment_parts RETURNING part)
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT batch.key, batch.value::bigint, now() FROM parts, json_each_text(parts.part) AS batch(key, value)
    ORDER BY batch.key COLLATE "C"
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
    if not key or (len(key) > MAX_KEY_CHARS_ANY_UTF8 and len(key.encode()) > MAX_KEY_BYTES):
        raise InvalidIncrement(f"{where}'key' must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
    if "\x00" in key:
        raise InvalidIncrement(f"{where}'key' must not contain NUL (U+0000): PostgreSQL text cannot hold it")
    if value is None:
        raise InvalidIncrement(f"{where}'value' is required")
    if type(value) is not int:  # bool is a subclass of int; `type` rejects it along with floats (and 1e26) and strings
        raise InvalidIncrement(f"{where}'value' must be an integer from 1 to {MAX_VALUE}")
    if not 1 <= value <= MAX_VALUE:
        raise InvalidIncrement(f"{where}'value' must be from 1 to {MAX_VALUE}")
    return key, value


def undecodable(error: orjson.JSONDecodeError) -> str:
    """The 400's message for a body orjson could not decode (the handler decodes inline, `parse_increments` too)."""
    return f"body must be JSON ({json_problem(error)})"


def parse_increments(body: bytes, max_items: int | None = MAX_ITEMS) -> list[tuple[str, int]]:
    """The (key, value) pairs of a request body; raises InvalidIncrement naming the first problem."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidIncrement(undecodable(error)) from None
    if type(document) is list:
        if not document:
            raise InvalidIncrement("array must hold at least one increment")
        if max_items is not None and len(document) > max_items:
            raise InvalidIncrement(f"array holds more than {max_items} increments")
        return [_check_item(item, f"item {index}: ") for index, item in enumerate(document)]
    return [_check_item(document, "")]


class PendingCounts(FlushBuffer):
    """This worker's counts not yet in PostgreSQL; the flusher swaps the dict out and writes it.

    Journal codec: a record is an accepted request body as it came (replayed through `parse_increments`), or
    SNAPSHOT_MARK + a JSON object of pending sums (what a full journal region is compacted into).
    """

    name = "increment"

    def __init__(self, max_pending_keys: int, flush_max_keys: int) -> None:
        super().__init__()
        self.pending: dict[str, int] = {}
        self.unacknowledged_keys = 0
        self.max_pending_keys = max_pending_keys
        self.flush_max_keys = flush_max_keys

    def add_all(self, items: list[tuple[str, int]], body: bytes) -> Response:
        """Add every item, or none (503 past the bound, 400 past the bigint range)."""
        pending = self.pending
        sums: dict[str, int] = {}
        for key, value in items:
            sums[key] = sums.get(key, 0) + value
        new_keys = 0
        for key, value in sums.items():
            current = pending.get(key)
            if current is None:
                new_keys += 1
            elif current + value > MAX_TOTAL:
                return TOTAL_TOO_LARGE
            if value > MAX_TOTAL:
                return TOTAL_TOO_LARGE
        if new_keys and len(pending) + new_keys + self.unacknowledged_keys > self.max_pending_keys:
            return OVERLOADED
        if not self.journal_append(body):
            return OVERLOADED
        size_before = len(pending)
        for key, value in sums.items():
            pending[key] = pending.get(key, 0) + value
        if size_before < self.flush_max_keys <= len(pending):
            self.request_flush()
        return ACCEPTED

    def backlog_keys(self) -> int:
        return len(self.pending) + self.unacknowledged_keys

    def backlog_full(self) -> bool:
        return self.backlog_keys() >= self.max_pending_keys

    # -- FlushBuffer ------------------------------------------------------------------------------------------------

    def take(self) -> dict[str, int] | None:
        if not self.pending:
            return None
        batch, self.pending = self.pending, {}
        self.unacknowledged_keys = len(batch)
        return batch

    def acknowledge(self) -> None:
        self.unacknowledged_keys = 0

    def describe(self, batch: dict[str, int]) -> tuple[int, int]:
        return len(batch), sum(batch.values())

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> int:
        await upsert_from_json_parts(conn, batch)
        return len(batch)

    def split(self, batch: dict[str, int]) -> list[dict[str, int]]:
        keys = sorted(batch)
        middle = len(keys) // 2
        if not middle:
            return [batch]
        return [{key: batch[key] for key in keys[:middle]}, {key: batch[key] for key in keys[middle:]}]

    def dead_letters(self, batch: dict[str, int]) -> list[str]:
        # json, not orjson: a replayed sum may pass 64 bits, which orjson refuses to write
        return [json.dumps({"key": key, "value": value}) for key, value in sorted(batch.items())]

    def snapshot(self) -> bytes:
        return SNAPSHOT_MARK + orjson.dumps(self.pending)

    def replay(self, records: Sequence[bytes]) -> dict[str, int]:
        """The counts in a dead worker's journal records. Every record was accepted (the framing leaves no torn
        ones), so nothing is re-validated here: what PostgreSQL refuses goes to the dead letters, not away."""
        counts: dict[str, int] = {}
        for record in records:
            if record.startswith(SNAPSHOT_MARK):
                items = list(orjson.loads(record[len(SNAPSHOT_MARK) :]).items())
            else:
                try:
                    document = orjson.loads(record)
                except orjson.JSONDecodeError:
                    log.error("event=journal_record_unreadable buffer=%s bytes=%d", self.name, len(record))
                    continue
                items = [(item["key"], item["value"]) for item in (document if type(document) is list else [document])]
            for key, value in items:
                counts[key] = counts.get(key, 0) + value
        return counts


async def json_parts(batch: dict[str, int], part_keys: int = JSON_PART_KEYS) -> AsyncIterator[bytes]:
    """The batch as JSON objects of at most `part_keys` keys, the event loop given back after each."""
    if len(batch) <= part_keys:
        yield _dumps(batch)
        return
    items = iter(batch.items())
    for _ in range(0, len(batch), part_keys):
        yield _dumps(dict(islice(items, part_keys)))
        await asyncio.sleep(0)


def _dumps(counts: dict[str, int]) -> bytes:
    try:
        return orjson.dumps(counts)
    except TypeError:  # a replayed sum past 64 bits: PostgreSQL refuses it (bigint), and the lane parks it
        return json.dumps(counts, ensure_ascii=False).encode()


async def upsert_from_json_parts(conn: psycopg.AsyncConnection[Any], batch: dict[str, int]) -> None:
    await conn.execute(CREATE_PARTS)
    async with conn.cursor().copy(COPY_PARTS) as copy:
        async for part in json_parts(batch):
            await copy.write(part + b"\n")
    await conn.execute(UPSERT_FROM_PARTS)


class IncrementFeature(Feature):
    """POST /increment and GET /counters/<key>."""

    name = "increment"
    schema = SCHEMA

    def __init__(self, context: FeatureContext) -> None:
        super().__init__(context)
        settings = context.settings
        self.pending = PendingCounts(settings.max_pending_keys, settings.flush_max_keys)
        self.read_pool = context.read_pool

    def routes(self) -> list[Route]:
        return [
            Route(b"POST", b"/increment", self.handle_increment, name="increment"),
            Route(b"GET", b"/counters/", self.handle_read_counter, prefix=True, name="read_counter", head=True),
        ]

    def buffers(self) -> list[FlushBuffer]:
        return [self.pending]

    def metrics(self) -> list[FeatureMetric]:
        return [
            FeatureMetric("pending_keys", "gauge", "distinct keys counted in memory, not yet taken by a flush",
                          len(self.pending.pending)),
        ]  # fmt: skip

    def handle_increment(self, path: bytes, query: bytes, body: bytes) -> Response:
        # The common case, one small object, inline: this is the hot path.
        pending = self.pending
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:  # its reason says where, and when the body is not UTF-8
            return error_response(400, undecodable(error))
        if type(document) is dict:
            key = document.get("key")
            value = document.get("value")
            if (
                type(key) is str
                and type(value) is int
                and 0 < len(key) <= MAX_KEY_CHARS_ANY_UTF8
                and 1 <= value <= MAX_VALUE
                and "\x00" not in key
            ):
                counts = pending.pending
                current = counts.get(key)
                if current is None:
                    if len(counts) + pending.unacknowledged_keys >= pending.max_pending_keys:
                        return OVERLOADED
                elif current + value > MAX_TOTAL:
                    return TOTAL_TOO_LARGE
                # Journal before answering (a crash after the 202 loses nothing): the append itself here, one call
                # fewer on the hot path; journal_append compacts a full region or says 503.
                journal = pending.journal
                if journal is not None and not journal.append(body) and not pending.journal_append(body):
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
        return pending.add_all(items, body)

    async def handle_read_counter(self, path: bytes, query: bytes, body: bytes) -> Response:
        raw_key = unquote_to_bytes(path[len(b"/counters/") :])
        try:
            key = raw_key.decode()
        except UnicodeDecodeError:
            return error_response(400, "key must be UTF-8")
        if not key or len(raw_key) > MAX_KEY_BYTES:
            return error_response(400, f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
        if "\x00" in key:  # no counter can hold it; PostgreSQL would refuse the query, not report "not found"
            return error_response(400, "key must not contain NUL (U+0000)")
        try:
            async with self.read_pool.connection() as conn:
                row = await (await conn.execute(READ_COUNTER, (key,))).fetchone()
        except (psycopg.OperationalError, OSError, TimeoutError):
            return DATABASE_UNAVAILABLE
        if row is None:
            return COUNTER_NOT_FOUND
        return json_response(200, {"key": row[0], "value": row[1], "updated_at": row[2].isoformat()})
