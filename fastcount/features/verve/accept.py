"""GET /api/verve/accept: the query parsed with bytes operations, the id deduplicated per window in this worker, new
ids and endpoints pending in memory until the flusher writes them (PostgreSQL deduplicates across workers).

Parsing and validation are pure functions (`parse_query`, `parse_id`, `parse_endpoint`) so unit tests need no server.
Windows are aligned to multiples of --verve-window seconds since the epoch; an id belongs to the window in which this
worker received it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import orjson
import psycopg

from fastcount.features.base import FlushBuffer, part_size
from fastcount.features.verve.schema import (
    COPY_ID_PARTS,
    CREATE_ID_PARTS,
    ID_PART_SIZE,
    INSERT_ENDPOINTS,
    INSERT_IDS_FROM_PARTS,
)
from fastcount.server.responses import Response

log = logging.getLogger(__name__)

MIN_ID = -(2**63)
MAX_ID = 2**63 - 1
MAX_ID_DIGITS = 20  # "-9223372036854775808"
MAX_ENDPOINT_BYTES = 2048
# Bytes searched for one byte as an int: `in` finds an int with memchr, while a bytes needle is first tried as an
# integer and a TypeError built and dropped (CPython 3.11: ~1,850 instructions against ~20 ns; see protocol.py).
PERCENT = ord("%")
_UNSAFE_IN_URL = re.compile(rb"[\x00-\x20\x7f]").search  # controls and spaces: never part of a URL
_BROKEN_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})").search  # unquote would keep it as typed, hiding the mistake

OK = Response(200, b"ok", b"text/plain", cacheable=True)
FAILED = Response(400, b"failed", b"text/plain", cacheable=True)
OVERLOADED = Response(503, b"failed", b"text/plain", ((b"Retry-After", b"1"),), cacheable=True)

# Journal records:
# - the id's digits as they came (a '-' or a digit first): a request with an id alone, the common one, in the window of
#   the WINDOW_MARK record before it. The journal's preamble (its rule 3) starts every region with the current window's,
#   so the request path writes the bytes it has (packing (window, id) took ~100 ns of ~1.3 us) and no larger a record;
# - WINDOW_MARK + window start: the window of the id records that follow;
# - RECORD_MARK + (window start, id) + the endpoint's UTF-8 when it is new in the window: a request with an endpoint;
# - SNAPSHOT_MARK + JSON of everything pending (what a full region is compacted into).
WINDOW_MARK = b"W"
RECORD_MARK = b"R"
SNAPSHOT_MARK = b"S"
WINDOW = struct.Struct("<q")
WINDOW_AND_ID = struct.Struct("<qq")
NEVER = 1 << 62  # a count no buffer reaches

# The current window's ids are kept in this many sets: a set that grows rehashes everything it holds in one add (one
# of 629,000 ids took 38.7 ms to), and a shard holds 1/64 of them. Sharded by bits 6-11, not the lowest: sequential ids
# sharing their low bits crowd a set's hash table (1M sequential ids: 0.39 s by the low bits, 0.16 s by these).
SEEN_SHARDS = 64
SHARD_MASK = SEEN_SHARDS - 1
SHARD_SHIFT = 6
# Shards a new window (or the max_pending bound) set aside are freed one per pass of the event loop, not all at once:
# freeing 1M ids in one go holds the loop for tens of milliseconds, and four shards at a time (62,700 ids, as each
# flush once did) held it 0.9-2.0 ms under bench/verve_accept.lua.

# A batch: {window start: ids} and {window start: endpoints}.
Batch = tuple[dict[int, list[int]], dict[int, list[str]]]


def parse_query(query: bytes) -> tuple[bytes | None, bytes | None, bool]:
    """(raw id, raw endpoint, well-formed): the first `id=` and `endpoint=` values; a second one of either is an
    error (which would count?). Other parameters are ignored."""
    raw_id: bytes | None = None
    raw_endpoint: bytes | None = None
    for part in query.split(b"&"):
        if part[:3] == b"id=":
            if raw_id is not None:
                return None, None, False
            raw_id = part[3:]
        elif part[:9] == b"endpoint=":
            if raw_endpoint is not None:
                return None, None, False
            raw_endpoint = part[9:]
    return raw_id, raw_endpoint, True


def parse_id(raw: bytes) -> int | None:
    """A signed 64-bit integer in plain decimal (an optional '-', ASCII digits), or None."""
    if not 0 < len(raw) <= MAX_ID_DIGITS:
        return None
    if not raw.isdigit() and not (raw[:1] == b"-" and raw[1:].isdigit()):
        return None
    value = int(raw)
    if not MIN_ID <= value <= MAX_ID:
        return None
    return value


def parse_endpoint(raw: bytes) -> str | None:
    """An absolute http:// or https:// URL with a host, at most 2,048 bytes once decoded, UTF-8, no spaces or
    control characters; or None. `+` is taken literally (RFC 3986), `%XX` is decoded."""
    if PERCENT in raw:
        if _BROKEN_ESCAPE(raw):
            return None
        raw = unquote_to_bytes(raw)
    if len(raw) > MAX_ENDPOINT_BYTES:
        return None
    lowered = raw[:8].lower()
    if lowered.startswith(b"https://"):
        rest = raw[8:]
    elif lowered.startswith(b"http://"):
        rest = raw[7:]
    else:
        return None
    if not rest or rest[:1] in b"/?#" or _UNSAFE_IN_URL(raw):
        return None  # no host
    try:
        endpoint = raw.decode()
        parts = urlsplit(endpoint)
        if not parts.hostname:  # "http://@/x", "http://:80/"
            return None
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in range)
    except (UnicodeDecodeError, ValueError):  # "http://[::1/x", "http://[zz]/"
        return None
    return endpoint


class PendingIds(FlushBuffer):
    """This worker's ids and endpoints not yet in PostgreSQL, per window, and the sets that deduplicate them in the
    current window. Bounded: past `max_pending` ids (pending plus the batch in retry) a new id gets 503.

    Idempotent (the flusher's rule 6): ids and endpoints are inserted ON CONFLICT DO NOTHING and nothing else is
    derived from them in the transaction (reports count the ids later; duplicates are counted on the request path), so
    a batch of more than twice `flush_max_keys` rows is committed in parts of at most that.
    """

    name = "verve"
    idempotent = True

    def __init__(self, window_seconds: int, max_pending: int, max_endpoints: int, flush_max_keys: int) -> None:
        super().__init__()
        self.window_seconds = window_seconds
        self.max_pending = max_pending
        self.max_endpoints = max_endpoints
        self.flush_max_keys = flush_max_keys
        self.transaction_rows = 2 * flush_max_keys  # a batch the early flush took is a little over it: one part
        self.pending_ids: dict[int, list[int]] = {}
        self.pending_endpoints: dict[int, list[str]] = {}
        self.pending_count = 0  # ids in pending_ids
        self.unacknowledged = 0  # ids of the batch the flusher took and has not committed yet
        self.room = max_pending  # pending_count's bound: max_pending less what is unacknowledged
        self.taken = 0  # ids taken by the flusher so far: accepted = taken + pending_count
        self.forgot_at = 0  # `accepted` when the seen sets were last set aside
        self.forget_at = max_pending + 1  # the pending_count at which the seen sets hold more than max_pending ids
        self.check_at = flush_max_keys  # the pending_count at which `_check_bounds` next has something to do
        self.window = -1
        self.window_end = -1.0
        # ids of the current window this worker took (pending or flushed), in shards (see SEEN_SHARDS)
        self.seen: list[set[int]] = [set() for _ in range(SEEN_SHARDS)]
        self.retired_seen: list[set[int]] = []  # set aside by `_forget_seen`, freed by `_free_retired`
        self.freeing: asyncio.AbstractEventLoop | None = None  # the loop a `_free_retired` is scheduled on
        self.endpoints_seen: set[str] = set()
        self.current_ids: list[int] = []
        self.current_endpoints: list[str] = []
        # counters, read on the tick (with `accepted`)
        self.duplicates = 0
        self.refused = 0  # 503s
        self.endpoints_dropped = 0

    @property
    def accepted(self) -> int:
        """New ids this worker took (the request path counts only pending_count: one increment fewer per id)."""
        return self.taken + self.pending_count

    def roll(self, now: float) -> None:
        """A new window: fresh dedup sets; the old window's pending ids stay for the flusher."""
        seconds = self.window_seconds
        self.window = int(now // seconds) * seconds
        self.window_end = float(self.window + seconds)
        journal = self.journal
        if journal is not None and not journal.set_preamble(WINDOW_MARK + WINDOW.pack(self.window), self.snapshot):
            self.request_flush()  # the region is sealed: what comes is refused until the flusher takes it
        self._forget_seen()
        self.endpoints_seen = set()
        self.current_ids = self.pending_ids.setdefault(self.window, [])
        self.current_endpoints = self.pending_endpoints.setdefault(self.window, [])

    def add_id(self, ident: int, digits: bytes, now: float) -> Response:
        """`add` without an endpoint, flat: the common request. `digits` is the id as it came (validated): its
        journal record."""
        if now >= self.window_end:
            self.roll(now)
        seen = self.seen[(ident >> SHARD_SHIFT) & SHARD_MASK]
        if ident in seen:
            self.duplicates += 1
            return OK
        if self.pending_count >= self.room:
            self.refused += 1
            return OVERLOADED
        journal = self.journal
        # the journal's append inline, as /increment's: compacting a full region is the rare case
        if journal is not None and not journal.append(digits) and not self.journal_append(digits):
            self.refused += 1
            return OVERLOADED
        seen.add(ident)
        self.current_ids.append(ident)
        self.pending_count += 1
        if self.pending_count >= self.check_at:
            self._check_bounds()
        return OK

    def add(self, ident: int, endpoint: str | None, now: float) -> Response:
        """Take one valid request with an endpoint: journal first, then memory."""
        if now >= self.window_end:
            self.roll(now)
        seen = self.seen[(ident >> SHARD_SHIFT) & SHARD_MASK]
        new_id = ident not in seen
        new_endpoint = False
        if endpoint is not None and endpoint not in self.endpoints_seen:
            if len(self.endpoints_seen) < self.max_endpoints:
                new_endpoint = True
            else:
                self.endpoints_dropped += 1
        if not new_id and not new_endpoint:
            self.duplicates += 1
            return OK
        if new_id and self.pending_count >= self.room:
            self.refused += 1
            return OVERLOADED
        record = RECORD_MARK + WINDOW_AND_ID.pack(self.window, ident)
        if new_endpoint:
            record += endpoint.encode()  # type: ignore[union-attr]
        if not self.journal_append(record):
            self.refused += 1
            return OVERLOADED
        if new_endpoint:
            self.endpoints_seen.add(endpoint)  # type: ignore[arg-type]
            self.current_endpoints.append(endpoint)  # type: ignore[arg-type]
        if new_id:
            seen.add(ident)
            self.current_ids.append(ident)
            self.pending_count += 1
            if self.pending_count >= self.check_at:
                self._check_bounds()
        else:
            self.duplicates += 1
        return OK

    def _check_bounds(self) -> None:
        """pending_count reached `check_at`: ask for an early flush at flush_max_keys (once per batch), and set the
        seen sets aside past max_pending ids (dedup here only saves writes: PostgreSQL's key decides)."""
        if self.pending_count == self.flush_max_keys:
            self.request_flush()
        if self.pending_count >= self.forget_at:
            self._forget_seen()
        self._next_check()

    def _next_check(self) -> None:
        self.forget_at = self.forgot_at + self.max_pending + 1 - self.taken  # seen = taken + pending - forgot_at
        flush_at = self.flush_max_keys if self.pending_count < self.flush_max_keys else NEVER
        self.check_at = min(flush_at, self.forget_at)

    def _forget_seen(self) -> None:
        if len(self.retired_seen) >= SEEN_SHARDS:  # freeing fell behind (a loop this busy?): bound the memory
            self.retired_seen.clear()
        self.retired_seen += self.seen
        self.seen = [set() for _ in range(SEEN_SHARDS)]
        self.forgot_at = self.accepted
        self._next_check()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a tool, a test): at once
            self.retired_seen.clear()
            return
        if self.freeing is not loop:  # (a chain left on a loop that stopped will not run again)
            loop.call_soon(self._free_retired)
            self.freeing = loop

    def _free_retired(self) -> None:
        """One shard set aside by `_forget_seen`, then again on the loop's next pass until none is left."""
        if self.retired_seen:
            del self.retired_seen[-1]
        if self.retired_seen:
            asyncio.get_running_loop().call_soon(self._free_retired)
        else:
            self.freeing = None

    def backlog_full(self) -> bool:
        return self.pending_count >= self.room

    # -- FlushBuffer ------------------------------------------------------------------------------------------------

    def take(self) -> Batch | None:
        if not self.pending_count and not any(self.pending_endpoints.values()):
            return None
        batch = (
            {window: ids for window, ids in self.pending_ids.items() if ids},
            {window: endpoints for window, endpoints in self.pending_endpoints.items() if endpoints},
        )
        self.unacknowledged = self.pending_count
        self.room = self.max_pending - self.unacknowledged
        self.taken += self.pending_count
        self.pending_count = 0
        self._next_check()
        self.pending_ids = {}
        self.pending_endpoints = {}
        if self.window >= 0:
            self.current_ids = self.pending_ids.setdefault(self.window, [])
            self.current_endpoints = self.pending_endpoints.setdefault(self.window, [])
        return batch

    def acknowledge(self) -> None:
        self.unacknowledged = 0
        self.room = self.max_pending

    def describe(self, batch: Batch) -> tuple[int, int]:
        ids = sum(len(values) for values in batch[0].values())
        return ids + sum(len(values) for values in batch[1].values()), ids

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> int:
        # Inside the flusher's transaction only: in autocommit the COPY would commit alone, and ON COMMIT DELETE ROWS
        # would empty the parts before the merge read them (ids lost without a sound).
        assert conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE, "write ids in a transaction"
        rows = 0
        if batch[0]:
            await conn.execute(CREATE_ID_PARTS)
            async with conn.cursor().copy(COPY_ID_PARTS) as copy:
                for window, ids in batch[0].items():
                    prefix = b"%d\x02" % window
                    for start in range(0, len(ids), ID_PART_SIZE):
                        await copy.write(prefix + orjson.dumps(ids[start : start + ID_PART_SIZE]) + b"\n")
                        await asyncio.sleep(0)  # the loop is given back between parts
                    rows += len(ids)
            await conn.execute(INSERT_IDS_FROM_PARTS)
        for window, endpoints in sorted(batch[1].items()):
            await conn.execute(INSERT_ENDPOINTS, (window, sorted(set(endpoints))))
            rows += len(endpoints)
        return rows

    def parts(self, batch: Batch, rows: int) -> Iterator[Batch]:
        """Parts of equal size (ids, then endpoints), in arrival order: list slices, nothing sorted here (each write
        sorts in SQL; see the flusher's rule 6)."""
        ids, endpoints = batch
        total = sum(len(values) for values in ids.values()) + sum(len(values) for values in endpoints.values())
        if total <= rows:
            yield batch
            return
        size = part_size(total, rows)
        lists: list[tuple[bool, int, list[Any]]] = [(True, window, values) for window, values in ids.items()]
        lists += [(False, window, values) for window, values in endpoints.items()]
        part: Batch = ({}, {})
        room = size
        for is_ids, window, values in lists:
            start = 0
            while start < len(values):
                piece = values[start : start + room]
                (part[0] if is_ids else part[1])[window] = piece
                start += len(piece)
                room -= len(piece)
                if not room:
                    yield part
                    part, room = ({}, {}), size
        if part[0] or part[1]:
            yield part

    def split(self, batch: Batch) -> list[Batch]:
        # In (window, id) order, so that the halves, written one after the other in one transaction, still insert in
        # the order every other flusher uses (no deadlock between a bisection and another worker's flush).
        items: list[tuple[int, int | None, str | None]] = [
            (window, ident, None) for window, ids in sorted(batch[0].items()) for ident in sorted(ids)
        ] + [(window, None, endpoint) for window, endpoints in sorted(batch[1].items()) for endpoint in endpoints]
        middle = len(items) // 2
        if not middle:
            return [batch]
        return [_batch_of(items[:middle]), _batch_of(items[middle:])]

    def dead_letters(self, batch: Batch) -> list[str]:
        ids = [json.dumps({"window_start": w, "id": i}) for w, values in sorted(batch[0].items()) for i in values]
        endpoints = [
            json.dumps({"window_start": w, "endpoint": e}) for w, values in sorted(batch[1].items()) for e in values
        ]
        return ids + endpoints

    # -- the crash journal's codec ----------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return SNAPSHOT_MARK + orjson.dumps(
            {
                "ids": [[window, ids] for window, ids in self.pending_ids.items() if ids],
                "endpoints": [[window, endpoints] for window, endpoints in self.pending_endpoints.items() if endpoints],
            }
        )

    def replay(self, records: Sequence[bytes]) -> Batch:
        ids: dict[int, set[int]] = {}
        endpoints: dict[int, set[str]] = {}
        window: int | None = None  # of the id records that follow
        unread = 0
        for record in records:
            kind = record[:1]
            try:
                if kind == WINDOW_MARK:
                    (window,) = WINDOW.unpack_from(record, 1)
                elif kind == RECORD_MARK:
                    window_of_record, ident = WINDOW_AND_ID.unpack_from(record, 1)
                    ids.setdefault(window_of_record, set()).add(ident)
                    if len(record) > 1 + WINDOW_AND_ID.size:
                        endpoints.setdefault(window_of_record, set()).add(record[1 + WINDOW_AND_ID.size :].decode())
                elif kind == SNAPSHOT_MARK:
                    document = orjson.loads(record[1:])
                    for window_of_part, values in document["ids"]:
                        ids.setdefault(window_of_part, set()).update(values)
                    for window_of_part, values in document["endpoints"]:
                        endpoints.setdefault(window_of_part, set()).update(values)
                elif window is not None and (ident := parse_id(record)) is not None:
                    ids.setdefault(window, set()).add(ident)
                else:
                    unread += 1
            except (struct.error, UnicodeDecodeError, orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                unread += 1
        if unread:  # a journal this version did not write (or a bug): said, since every record was an answered `ok`
            log.warning("event=journal_records_unread buffer=%s records=%d", self.name, unread)
        return (
            {window: sorted(values) for window, values in ids.items()},
            {window: sorted(values) for window, values in endpoints.items()},
        )


def _batch_of(items: list[tuple[int, int | None, str | None]]) -> Batch:
    ids: dict[int, list[int]] = {}
    endpoints: dict[int, list[str]] = {}
    for window, ident, endpoint in items:
        if ident is not None:
            ids.setdefault(window, []).append(ident)
        if endpoint is not None:
            endpoints.setdefault(window, []).append(endpoint)
    return ids, endpoints
