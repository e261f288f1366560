"""POST /events and GET /metrics: accept analytics events into this worker's pending set (journaled first), write
them on flush with database-side deduplication and rollups, and answer exact totals and unique users from rollups.

The request path never waits on PostgreSQL; the pending set is bounded (503 + Retry-After past --events-max-pending
events or --events-max-pending-bytes of estimated memory).
Rules live in validation.py, tables and the flush in store.py, the query in query.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson
import psycopg

from fastcount.features.base import Feature, FeatureContext, FeatureMetric, FlushBuffer, part_size
from fastcount.features.events.query import InvalidQuery, parse_query, run_query
from fastcount.features.events.store import DAY, SCHEMA, maintain, write_batch
from fastcount.features.events.validation import (
    MAX_BULK,
    Clock,
    Event,
    InvalidEvent,
    check_document,
    check_event,
    undecodable,
)
from fastcount.server.responses import Response, constant_error, error_response, json_response
from fastcount.server.routing import Route
from fastcount.settings import SettingError, check_knobs, knob
from fastcount.store.database import connect

log = logging.getLogger(__name__)

ACCEPTED_ONE = json_response(202, {"accepted": 1}, cacheable=True)
OVERLOADED = constant_error(503, "too many pending events; retry later", ((b"Retry-After", b"1"),))
DATABASE_UNAVAILABLE = constant_error(503, "database unavailable", ((b"Retry-After", b"1"),))
QUERY_FAILED = constant_error(500, "the metrics query failed (logged as event=metrics_query_failed)")
SNAPSHOT_MARK = b"S"  # starts a journal record holding every pending event; no JSON text starts with it
MAINTAIN_EVERY = 3600.0
MAINTAIN_RETRY = 60.0
# An accepted event's memory, estimated from its JSON: measured at 1.3-3x the JSON (dicts, strings, the key) for
# events of 100 B to 3 KB, so 3x, plus a fixed part for the dict entry and the key tuple.
BYTES_PER_JSON_BYTE = 3
BYTES_PER_EVENT = 512
OPEN_BRACE = ord("{")  # counted in a body refused before decoding: ~30 us per 100 KB, against ~280 us to decode it


@dataclass(frozen=True)
class EventsSettings:
    events_max_skew: float = knob(5.0, "seconds an event's timestamp may be ahead of the server clock", minimum=0)
    events_retention: int = knob(
        90, "days of events kept: older timestamps are refused, older daily partitions dropped", minimum=1
    )
    events_flush_max: int = knob(
        50_000,
        "pending events of a worker that trigger an early flush; one flush transaction writes at most twice this many"
        " (a larger batch is committed in parts)",
        minimum=1,
    )
    events_max_body: int = knob(
        2**20,
        "largest POST /events body in bytes (a bulk array of up to 1,000 events); other routes keep --max-body",
        minimum=1,
    )
    events_max_pending: int = knob(
        1_000_000, "events per worker (pending + in retry) past which new events get 503", minimum=1
    )
    events_max_pending_bytes: int = knob(
        256 * 2**20,
        "estimated memory in bytes of a worker's events (pending + in retry; 3 x their JSON + 512 each) past which"
        " new events get 503",
        minimum=2**20,
    )

    def __post_init__(self) -> None:
        check_knobs(self)
        if self.events_flush_max > self.events_max_pending:
            raise SettingError(
                f"{{0}} ({self.events_flush_max}) must not exceed {{1}} ({self.events_max_pending})",
                "events_flush_max",
                "events_max_pending",
            )


EventKey = tuple[int, bytes]  # (UTC day of the timestamp, identity): the database's key, (day, id), in memory too


@dataclass
class EventBatch:
    events: dict[EventKey, Event]  # (day, identity) -> canonical event: the first accepted of that key


class PendingEvents(FlushBuffer):
    """Events accepted by this worker and not yet committed, keyed by (day, identity) like the database's primary
    key, first accepted wins like ON CONFLICT DO NOTHING (a retry within one flush interval is dropped here already;
    the database drops the rest). A replay of the journal keeps the same first one, so live and replay agree.

    Journal codec: a record is a request body as accepted (an object or an array of accepted events only), or
    SNAPSHOT_MARK + a JSON array of every pending event. Replay checks everything again except the clock.

    Idempotent (the flusher's rule 6): an event written twice is stored once, and rollups and user numbers are derived
    from the rows a write inserted, so a batch of more than twice `flush_max` events is committed in parts of at most
    that.
    """

    name = "events"
    idempotent = True

    def __init__(self, max_pending: int, flush_max: int, max_pending_bytes: int = 256 * 2**20) -> None:
        super().__init__()
        self.pending: dict[EventKey, Event] = {}
        self.unacknowledged = 0
        self.pending_bytes = 0  # estimated memory of `pending`, and of the batch taken and not yet acknowledged
        self.unacknowledged_bytes = 0
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.flush_max = flush_max
        self.transaction_rows = 2 * flush_max  # a batch the early flush took is a little over flush_max: one part
        self.accepted = 0  # counters for the worker's tick
        self.rejected = 0
        self.duplicates = 0
        # Events the writes of the flusher's current transaction found already stored, counted only once it committed.
        self.transaction_duplicates = 0
        # (body bytes, events) of a request the pending or bytes bound refused since the last commit, or None: a body
        # at least as large that may hold as many events is refused before it is decoded (see `refuses`).
        self.refused_at: tuple[int, int] | None = None

    # -- the request path -------------------------------------------------------------------------------------------

    def add_one(self, identity: bytes, event: Event, record: bytes) -> Response:
        pending = self.pending
        if len(pending) + self.unacknowledged >= self.max_pending:
            return OVERLOADED
        cost = len(record) * BYTES_PER_JSON_BYTE + BYTES_PER_EVENT
        if self._over_bytes(cost):
            return OVERLOADED
        if not self.journal_append(record):  # journal before answering: a crash after the 202 loses nothing
            return OVERLOADED
        self.accepted += 1
        key = (event["timestamp"] // DAY, identity)
        if key in pending:
            self.duplicates += 1
            return ACCEPTED_ONE
        pending[key] = event
        self.pending_bytes += cost
        if len(pending) == self.flush_max or self.pending_bytes * 2 >= self.max_pending_bytes:
            self.request_flush()
        return ACCEPTED_ONE

    def _over_bytes(self, cost: int) -> bool:
        """True when `cost` more bytes would pass the bound (a request is always taken when nothing is held)."""
        held = self.pending_bytes + self.unacknowledged_bytes
        return held > 0 and held + cost > self.max_pending_bytes

    def add_many(self, accepted: list[tuple[bytes, Event]], record: bytes) -> Response | None:
        """None when all were added; else the refusal (503), and none was added."""
        pending = self.pending
        if len(pending) + self.unacknowledged + len(accepted) > self.max_pending:
            return OVERLOADED
        if self._over_bytes(len(record) * BYTES_PER_JSON_BYTE + len(accepted) * BYTES_PER_EVENT):
            return OVERLOADED
        if not self.journal_append(record):
            return OVERLOADED
        size_before = len(pending)
        self.accepted += len(accepted)
        for identity, event in accepted:
            key = (event["timestamp"] // DAY, identity)
            if key in pending:
                self.duplicates += 1
            else:
                pending[key] = event
        added = len(pending) - size_before
        if added:  # each added event's share of the request
            self.pending_bytes += (len(record) * BYTES_PER_JSON_BYTE * added) // len(accepted) + added * BYTES_PER_EVENT
        if size_before < self.flush_max <= len(pending) or self.pending_bytes * 2 >= self.max_pending_bytes:
            self.request_flush()
        return None

    def refuses(self, body_size: int, items: int) -> bool:
        """True when a request of `body_size` bytes holding `items` events would get 503 if they were all valid: the
        pending bound, the bytes bound, or a journal that cannot take the body until the next flush. Checked between
        decoding and validating, which is most of a request's cost, so that clients retrying into a full worker do
        not take the time its flush needs. (An array with invalid items is journaled and counted as its accepted
        items only, so it may be refused here though it would have fitted.)

        A refusal by the bounds is remembered until the next commit (`refused_before_decoding`): until then, what
        is held only grows or moves from pending to the batch in flight, so a request at least as large in bytes
        and in events is refused too. Only while something is held, so that a commit is sure to come. (The journal
        makes room at the next take, sooner: its refusals are not remembered.)"""
        if len(self.pending) + self.unacknowledged + items > self.max_pending or self._over_bytes(
            body_size * BYTES_PER_JSON_BYTE + items * BYTES_PER_EVENT
        ):
            refused_at = self.refused_at
            if (self.pending or self.unacknowledged) and (
                refused_at is None or (body_size <= refused_at[0] and items <= refused_at[1])
            ):
                self.refused_at = (body_size, items)
            return True
        journal = self.journal
        return journal is not None and journal.refuses(body_size)

    def refused_before_decoding(self, body: bytes) -> bool:
        """True when `body` is at least as large as a request the bounds refused since the last commit, and may hold
        as many events: every event object has a '{' (an event with metadata has more, so such a body may be
        refused a moment early, until the commit; never later)."""
        refused_at = self.refused_at
        return refused_at is not None and len(body) >= refused_at[0] and body.count(OPEN_BRACE) >= refused_at[1]

    def backlog_full(self) -> bool:
        return (
            len(self.pending) + self.unacknowledged >= self.max_pending
            or self.pending_bytes + self.unacknowledged_bytes >= self.max_pending_bytes
        )

    # -- FlushBuffer ------------------------------------------------------------------------------------------------

    def take(self) -> EventBatch | None:
        if not self.pending:
            return None
        batch = EventBatch(self.pending)
        self.pending = {}
        self.unacknowledged = len(batch.events)
        self.unacknowledged_bytes, self.pending_bytes = self.pending_bytes, 0
        return batch

    def acknowledge(self) -> None:
        self.unacknowledged = 0
        self.unacknowledged_bytes = 0
        self.refused_at = None

    def describe(self, batch: EventBatch) -> tuple[int, int]:
        return len(batch.events), len(batch.events)

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: EventBatch) -> int:
        inserted = await write_batch(conn, batch.events)
        # Events of a write PostgreSQL refused (and the lane parks) are not duplicates: only a write that returned.
        self.transaction_duplicates += len(batch.events) - inserted
        return inserted

    def transaction_ended(self, committed: bool) -> None:
        if committed:  # own batches and dead workers' alike
            self.duplicates += self.transaction_duplicates
        self.transaction_duplicates = 0

    def parts(self, batch: EventBatch, rows: int) -> Iterator[EventBatch]:
        """Parts of equal size, in arrival order (each write sorts its rows in SQL; see the flusher's rule 6)."""
        if len(batch.events) <= rows:
            yield batch
            return
        size = part_size(len(batch.events), rows)
        items = iter(batch.events.items())
        for _ in range(0, len(batch.events), size):
            yield EventBatch(dict(islice(items, size)))

    def split(self, batch: EventBatch) -> list[EventBatch]:
        identities = sorted(batch.events)
        middle = len(identities) // 2
        if not middle:
            return [batch]
        halves = (identities[:middle], identities[middle:])
        return [EventBatch({i: batch.events[i] for i in half}) for half in halves]

    def dead_letters(self, batch: EventBatch) -> list[str]:
        return [orjson.dumps(event).decode() for _, event in sorted(batch.events.items())]

    def snapshot(self) -> bytes:
        return SNAPSHOT_MARK + orjson.dumps(list(self.pending.values()))

    def replay(self, records: Sequence[bytes]) -> EventBatch:
        """The events in a dead worker's journal records."""
        events: dict[EventKey, Event] = {}
        clock = Clock(None, 0.0, 0)
        for record in records:
            try:
                document = orjson.loads(record[len(SNAPSHOT_MARK) :] if record.startswith(SNAPSHOT_MARK) else record)
                parsed = check_document(document, clock, max_items=None)
            except (orjson.JSONDecodeError, InvalidEvent):
                continue
            for identity, event in parsed.accepted:  # first wins, as in add_one/add_many and in the database
                events.setdefault((event["timestamp"] // DAY, identity), event)
        return EventBatch(events)


class EventsFeature(Feature):
    """POST /events and GET /metrics."""

    name = "events"
    settings_class = EventsSettings
    schema = SCHEMA

    def __init__(self, context: FeatureContext) -> None:
        super().__init__(context)
        self.settings = context.section(EventsSettings)
        self.buffer = PendingEvents(
            self.settings.events_max_pending, self.settings.events_flush_max, self.settings.events_max_pending_bytes
        )
        self.read_pool = context.read_pool
        self.clock = Clock(0, self.settings.events_max_skew, self.settings.events_retention * DAY)
        self.max_range = (self.settings.events_retention + 1) * DAY  # GET /metrics: what partitions are kept for

    def routes(self) -> list[Route]:
        return [
            Route(b"POST", b"/events", self.handle_events, name="events", max_body=self.settings.events_max_body),
            Route(b"GET", b"/metrics", self.handle_metrics, name="metrics", head=True),
        ]

    def buffers(self) -> list[FlushBuffer]:
        return [self.buffer]

    def metrics(self) -> list[FeatureMetric]:
        buffer = self.buffer
        return [
            FeatureMetric("events_accepted", "counter", "events answered 202 (duplicates included)", buffer.accepted),
            FeatureMetric("events_rejected", "counter", "events refused as invalid (400, or by index in a bulk)",
                          buffer.rejected),
            FeatureMetric("events_duplicates_dropped", "counter",
                          "accepted events not stored because the same identity was already pending or stored",
                          buffer.duplicates),
            FeatureMetric("events_pending", "gauge", "events in memory, not yet taken by a flush", len(buffer.pending)),
            FeatureMetric("events_held_bytes", "gauge", "estimated memory of events held (pending + in retry)",
                          buffer.pending_bytes + buffer.unacknowledged_bytes),
        ]  # fmt: skip

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.maintain_partitions]

    def _clock(self) -> Clock:
        now = int(time.time())
        clock = self.clock
        if clock.now != now:
            clock = self.clock = Clock(now, clock.max_skew, clock.retention_seconds)
        return clock

    def handle_events(self, path: bytes, query: bytes, body: bytes) -> Response:
        buffer = self.buffer
        if buffer.refused_at is not None and buffer.refused_before_decoding(body):  # (the attribute first: no call)
            # Clients retrying into a full worker had it spend a third of its time decoding arrays it then refused
            # (bench/events_bulk.lua: 52-53k -> 56-58k events/s sustained without that work).
            buffer.request_flush()
            return OVERLOADED
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:  # its reason says where, and when the body is not UTF-8
            buffer.rejected += 1
            return error_response(400, undecodable(error))
        if buffer.refuses(len(body), len(document) if type(document) is list else 1):
            buffer.request_flush()  # refused before validating: that work must not eat the time the flush needs
            return OVERLOADED
        if type(document) is dict:  # the common case, inline: this is the hot path
            try:
                identity, event = check_event(document, self._clock())
            except InvalidEvent as problem:
                buffer.rejected += 1
                return error_response(400, str(problem))
            return buffer.add_one(identity, event, body)
        try:
            parsed = check_document(document, self._clock(), MAX_BULK)
        except InvalidEvent as problem:
            buffer.rejected += len(problem.rejected) if problem.rejected else 1
            if problem.rejected:
                return json_response(400, {"error": str(problem), "rejected": problem.rejected})
            return error_response(400, str(problem))
        record = body if not parsed.rejected else orjson.dumps([event for _, event in parsed.accepted])
        refused = buffer.add_many(parsed.accepted, record)
        if refused is not None:
            return refused
        buffer.rejected += len(parsed.rejected)
        return json_response(202, {"accepted": len(parsed.accepted), "rejected": parsed.rejected})

    async def handle_metrics(self, path: bytes, query: bytes, body: bytes) -> Response:
        try:
            metrics_query = parse_query(query, int(time.time()), self.max_range)
        except InvalidQuery as problem:
            return error_response(400, str(problem))
        try:
            async with self.read_pool.connection() as conn:
                answer = await run_query(conn, metrics_query)
        except (psycopg.OperationalError, OSError, TimeoutError):
            return DATABASE_UNAVAILABLE
        except psycopg.Error:  # PostgreSQL refused the query itself: a bug of ours, not a reason to retry (503)
            log.exception("event=metrics_query_failed query=%r", query)
            return QUERY_FAILED
        return json_response(200, answer)

    async def maintain_partitions(self) -> None:
        """Partitions ahead of need and retention, hourly; one process does it at a time (the others skip)."""
        while True:
            delay = MAINTAIN_EVERY
            try:
                async with asyncio.timeout(60.0):
                    conn = await connect(self.context.dsn, statement_timeout=30.0)
                    try:
                        dropped = await maintain(conn, int(time.time()) // DAY, self.settings.events_retention)
                    finally:
                        await conn.close()
                for name in dropped:
                    log.info("event=events_partition_dropped partition=%s", name)
            except (psycopg.Error, OSError, TimeoutError) as error:
                log.warning("event=events_maintenance_failed error=%r", str(error).strip() or type(error).__name__)
                delay = MAINTAIN_RETRY
            await asyncio.sleep(delay)
