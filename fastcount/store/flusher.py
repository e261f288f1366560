"""The flusher: takes each feature's pending batch on a timer (or when a buffer fills) and writes it to PostgreSQL.

Rules it keeps:
1. A batch, once taken, is written verbatim until it is acknowledged: same writer, same sequence number, same content.
   The ledger row (writer, seq) is inserted in the same transaction as the data, so a retry after an unknown outcome
   (the connection broke after COMMIT was sent) fails as a duplicate instead of counting twice.
2. While a batch is being retried, new requests keep accumulating in the feature's buffer; the buffer bounds itself.
3. Timer ticks are aligned to multiples of the interval, so flushes do not drift; on stop, everything is flushed.
It owns one connection of its own; what the rows mean is each buffer's business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import psycopg.errors

from fastcount.observability.stats import WorkerStats
from fastcount.store.database import connect, migrate_async

log = logging.getLogger(__name__)

LEDGER_PKEY = "fastcount_batches_pkey"
RECORD_BATCH = "INSERT INTO fastcount_batches (writer, seq, keys, total) VALUES (%s, %s, %s, %s)"
PRUNE_OWN_BATCHES = "DELETE FROM fastcount_batches WHERE writer = %s AND seq < %s"
PRUNE_EVERY_SECONDS = 60.0
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 5.0
# Test-only fault injection: drop the connection right after this many successful COMMITs, as a network failure
# would, so the caller cannot know the outcome. Read once at start; unset in production.
FAILPOINT_ENV = "FASTCOUNT_FAILPOINT_DROP_AFTER_COMMIT"


class FlushBuffer(Protocol):
    """What a feature hands the flusher: a swap-out of pending work and the SQL that writes it."""

    name: str

    def take(self, seq: int) -> Any | None:
        """Swap out everything pending (O(1)) as batch `seq` and return it, or None when there is nothing."""

    def acknowledge(self) -> None:
        """The batch last taken is durable: forget it."""

    def describe(self, batch: Any) -> tuple[int, int]:
        """(distinct keys, sum of values) of a batch, for the ledger."""

    async def write(self, conn: psycopg.AsyncConnection[Any], batch: Any) -> int:
        """Write the batch inside the caller's transaction; return rows written."""


@dataclass
class InFlight:
    writer: str  # the ledger identity: this worker's, or a dead worker's for a batch recovered from its journal
    seq: int
    batch: Any
    keys: int
    total: int


def writer_identity(slot: int) -> str:
    """Unique for this process's lifetime across hosts and restarts: host, slot, pid and a random token."""
    return f"{socket.gethostname()}/w{slot}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Flusher:
    def __init__(self, dsn: str, buffers: list[FlushBuffer], interval: float, writer: str, stats: WorkerStats) -> None:
        self.dsn = dsn
        self.buffers = buffers
        self.interval = interval
        self.writer = writer
        self.stats = stats
        self.connected = False
        self.failing_since: float | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._in_flight: dict[str, InFlight] = {}
        self._adopted: list[tuple[FlushBuffer, InFlight]] = []  # dead workers' batches, written first
        self.on_adopted_written: Callable[[], None] | None = None
        self._next_seq = 1
        self._wake = asyncio.Event()
        self._stopping = False
        self._retry_delay = 0.0
        self._last_prune = time.monotonic()
        self._drop_after_commits = int(os.environ.get(FAILPOINT_ENV, "0") or 0)

    def request_flush(self) -> None:
        self._wake.set()

    def writer_of(self, buffer: FlushBuffer) -> str:
        return f"{self.writer}/{buffer.name}"

    def adopt(self, buffer: FlushBuffer, writer: str, seq: int, batch: Any) -> None:
        """Write a batch a dead worker left, under its identity, before anything of ours."""
        keys, total = buffer.describe(batch)
        self._adopted.append((buffer, InFlight(writer, seq, batch, keys, total)))
        self._wake.set()

    async def run(self) -> None:
        """Flush on every tick until stopped, then until a pass finds nothing left."""
        while True:
            await self._wait_until_due()
            try:
                written, took_any = await self.flush_all()
            except Exception:
                # Not a database error (those are retried inside): a bug. Keep the batch, keep trying, never stop
                # flushing silently; the batch stays in flight and the journal keeps it.
                log.exception("event=flush_crashed")
                self.stats.flush_errors += 1
                self._retry_delay = RETRY_MAX_DELAY
                await self._close()
                continue
            if self._stopping and written and not took_any:
                break
        await self._close()

    async def stop(self, task: asyncio.Task[None]) -> None:
        self._stopping = True
        self._wake.set()
        await task

    async def flush_all(self) -> tuple[bool, bool]:
        """One pass over every buffer: (all written, anything was taken). A failed batch stays in flight."""
        took_any = bool(self._adopted)
        while self._adopted:
            adopted_buffer, adopted = self._adopted[0]
            if not await self._write(adopted_buffer, adopted):
                return False, took_any
            self._adopted.pop(0)
            if not self._adopted and self.on_adopted_written is not None:
                self.on_adopted_written()
        for buffer in self.buffers:
            in_flight = self._in_flight.get(buffer.name)
            if in_flight is None:
                batch = buffer.take(self._next_seq)
                if batch is None:
                    continue
                keys, total = buffer.describe(batch)
                in_flight = InFlight(self.writer_of(buffer), self._next_seq, batch, keys, total)
                self._next_seq += 1
                self._in_flight[buffer.name] = in_flight
            took_any = True
            if not await self._write(buffer, in_flight):
                return False, took_any
            del self._in_flight[buffer.name]
            buffer.acknowledge()
        await self._prune_if_due()
        return True, took_any

    async def _wait_until_due(self) -> None:
        if self._retry_delay:  # back off; an early-flush wake-up must not shorten it
            await asyncio.sleep(self._retry_delay)
            return
        if self._stopping:
            return
        now = time.time()
        timeout = (now // self.interval + 1) * self.interval - now
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _write(self, buffer: FlushBuffer, in_flight: InFlight) -> bool:
        writer = in_flight.writer
        started = time.perf_counter()
        try:
            conn = await self._connection()
            try:
                async with conn.transaction():
                    await conn.execute(RECORD_BATCH, (writer, in_flight.seq, in_flight.keys, in_flight.total))
                    rows = await buffer.write(conn, in_flight.batch)
            except psycopg.errors.UniqueViolation as error:
                if error.diag.constraint_name != LEDGER_PKEY:
                    raise
                log.warning("event=batch_already_committed writer=%s seq=%d", writer, in_flight.seq)
                rows = 0
            if self._drop_after_commits > 0:
                self._drop_after_commits -= 1
                await self._close()
                raise psycopg.OperationalError("injected failure: connection lost after COMMIT")
        except (psycopg.Error, OSError) as error:
            await self._close()
            self.stats.flush_errors += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self._retry_delay = min(RETRY_MAX_DELAY, max(RETRY_FIRST_DELAY, self._retry_delay * 2))
            self.stats.flush_retries += 1
            log.warning(
                "event=flush_failed writer=%s seq=%d keys=%d retry_in=%.1fs error=%r",
                writer,
                in_flight.seq,
                in_flight.keys,
                self._retry_delay,
                str(error).strip(),
            )
            return False
        if self.failing_since is not None:
            log.info("event=flush_recovered writer=%s after=%.1fs", writer, time.monotonic() - self.failing_since)
        self.failing_since = None
        self._retry_delay = 0.0
        self.stats.flushes += 1
        self.stats.flushed_rows += rows
        self.stats.flush_seconds.observe(time.perf_counter() - started)
        self.stats.flush_keys.observe(in_flight.keys)
        return True

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(self.dsn)
            await migrate_async(self._conn)
            self.connected = True
        return self._conn

    async def _close(self) -> None:
        self.connected = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass

    async def _prune_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_SECONDS or self._conn is None:
            return
        self._last_prune = now
        try:
            for buffer in self.buffers:
                await self._conn.execute(PRUNE_OWN_BATCHES, (self.writer_of(buffer), self._next_seq - 1))
        except psycopg.Error as error:
            log.warning("event=ledger_prune_failed error=%r", str(error).strip())
            await self._close()
