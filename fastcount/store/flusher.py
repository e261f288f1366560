"""The flusher: one lane per flush buffer; each takes its buffer's pending batch on a timer (or when the buffer fills)
and writes it to PostgreSQL on a connection of its own, so one buffer's trouble never delays another's.

Rules a lane keeps:
1. A batch, once taken, is written verbatim until it is committed: same writer, same sequence number, same content.
   The ledger row (writer, seq) is inserted in the same transaction as the data (its last part's: rule 6), so a retry
   after an unknown outcome (the connection broke after COMMIT was sent) fails as a duplicate instead of counting
   twice.
2. Errors are classified. Transient (connection lost, timeout, serialization, anything not about the data): retry
   the same batch with back-off. Permanent (PostgreSQL refuses the data: class 22 and 23 errors): in one transaction
   with the ledger row, bisect the batch under savepoints, commit every item PostgreSQL takes and park each item it
   refuses in `fastcount_dead_letters` with the error. Nothing answered is silently dropped; nothing blocks forever.
3. While a batch is retried, new requests keep accumulating in the buffer; the buffer bounds itself.
4. The interval bounds how long an answered request waits to be committed: a lane starts its next pass one interval
   after the last one began, less the time its last write took (PostgreSQL's merge of 10,000 keys takes ~0.1 s
   here, and the next batch's rows must be visible by then too). Lanes start at phases of their own within the
   interval, so they do not wake together nor with the worker's stats tick at the second; on stop, everything is
   flushed.
5. Every statement has a timeout and the connection TCP keepalives: a half-open connection cannot hang a lane.
   --flush-timeout bounds one transaction (rule 6 keeps an idempotent buffer's transactions small however large its
   batch: one of 1.4M events took longer than the timeout, and was retried whole, forever). A transaction gets longer
   when its size needs it, one second per ROWS_PER_TIMEOUT_SECOND rows (a batch that must be one transaction,
   increments: with --flush-timeout 3, a backlog of 1M keys, ~4-7 s to merge here, timed out on every attempt,
   forever); its statement and idle-in-transaction timeouts both. The asyncio backstop of an attempt allows
   BACKSTOP_TIMEOUTS statement timeouts (a transaction is several statements) plus BACKSTOP_MARGIN seconds, counted
   again from each statement a refused batch's bisection gets answered (accepted, refused or parked): that one
   transaction makes about two statements per refused item, each bounded on its own, so no fixed bound fits it.
6. An idempotent buffer's batch of more than its `transaction_rows` is committed in parts (`FlushBuffer.parts`, cut
   once, the same on every attempt), one transaction each, the ledger row with the last part only. A failed part is
   retried as rule 2 says (bisection within that part) from the first part not committed. Why this stays exact:
   a. Writing an idempotent buffer's item again stores nothing twice, and whatever else its write does (rollups,
      user numbers) is derived from the rows it inserted in its own transaction: a committed part written again adds
      nothing. Dead letters are parked once per (writer, seq, item).
   b. Recovery: the ledger holds (writer, seq) only once the last part committed, so after every part did. A journal
      region without it is replayed whole (parts that had committed add nothing, by a). One with it was written
      whole: its replay goes straight to its last part, which the ledger row settles (a batch of 1.4M events is not
      written again part by part, each event counted as a duplicate dropped).
   c. What a buffer derives in memory (a counter: the events' duplicates) is applied per transaction, only once
      the lane knows it committed (`transaction_ended`). A COMMIT that got no answer is settled as rule 1 settles a
      whole batch's: each part's transaction starts by inserting its own ledger key, the batch's row for the last
      part, (writer, seq, cut, part) in `fastcount_parts` for the others; the attempt that writes the part again fails
      on that key if the first committed (or waits for it while it runs). The database it writes to tells, so a
      failover that lost the first attempt's commit loses its key with it (a transaction id would not tell: the new
      primary may have given the same id to a transaction of its own). `cut` is a random token of one cut of the
      batch (one in-flight batch): a batch replayed from a dead worker's journal is cut again, maybe in another order,
      so the dead worker's part keys tell nothing about the new parts (those parts are written again, by a). The last
      part deletes the parts' rows.
   d. Each part's write takes its row locks in key order (sorted in SQL) and holds them to its own COMMIT only, so
      parts, unlike bisection's halves in one transaction, need no order between them: they are cut in arrival order
      (sorting a batch of 1M events in Python holds the event loop ~2.5 s).
What the rows mean is each buffer's business (fastcount/features/base.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from fastcount.features.base import FlushBuffer
from fastcount.observability.stats import WorkerStats
from fastcount.store.database import connect, migrate_async

log = logging.getLogger(__name__)

LEDGER_PKEY = "fastcount_batches_pkey"
RECORD_BATCH = (
    "INSERT INTO fastcount_batches (writer, seq, keys, total) VALUES (%(writer)s, %(seq)s, %(keys)s, %(total)s)"
)
# An idempotent buffer's: the rows of the parts before the last (of every cut: a dead worker's too) go with it.
RECORD_IDEMPOTENT_BATCH = (
    f"WITH parts AS (DELETE FROM fastcount_parts WHERE writer = %(writer)s AND seq = %(seq)s) {RECORD_BATCH}"
)
RECORD_DEAD_LETTER = """
    INSERT INTO fastcount_dead_letters (feature, writer, seq, item, sqlstate, error)
    SELECT %(feature)s, %(writer)s, %(seq)s, refused.item, %(sqlstate)s, %(error)s
    FROM unnest(%(items)s::text[]) AS refused(item)
"""
# Once per (writer, seq, item): a part of a batch written again after a crash (rule 6) refuses its items again. The
# batch's items already parked are read once per bisection, not looked up per item: `NOT EXISTS` per parked item
# scanned the ones parked before it (10,000 refused items of one batch: 13.5 s, quadratic; an index on the item did
# not help, the planner scans a table whose rows are the transaction's own).
PARKED_ITEMS = "SELECT item FROM fastcount_dead_letters WHERE writer = %s AND seq = %s"
PRUNE_OWN_BATCHES = "DELETE FROM fastcount_batches WHERE writer = %s AND seq < %s"
PARTS_PKEY = "fastcount_parts_pkey"
RECORD_PART = "INSERT INTO fastcount_parts (writer, seq, cut, part) VALUES (%s, %s, %s, %s)"
BATCH_RECORDED = "SELECT 1 FROM fastcount_batches WHERE writer = %s AND seq = %s"
PRUNE_EVERY_SECONDS = 60.0
PING_WHEN_IDLE_FOR = 5.0  # seconds: an idle lane checks its connection, so `connected` means reachable
RETRY_FIRST_DELAY = 0.1
ROWS_PER_TIMEOUT_SECOND = 50_000  # rule 5: a third of the merge rate measured here (1M keys in ~7 s)
# This transaction only: its statements, and the time between them (a refused batch's bisection sorts its keys in
# Python between statements: ~1.2 s for 1M keys, past a --flush-timeout of 1 s).
EXTEND_TIMEOUT = (
    "SELECT set_config('statement_timeout', %(ms)s, true), set_config('idle_in_transaction_session_timeout', %(ms)s,"
    " true)"
)
BACKSTOP_TIMEOUTS = 4  # rule 5
BACKSTOP_MARGIN = 5.0  # seconds past those before the lane gives up on a silent connection
RETRY_MAX_DELAY = 5.0
# Test-only fault injection: drop the connection right after this many successful COMMITs, as a network failure
# would, so the caller cannot know the outcome. Read once at start; unset in production.
FAILPOINT_ENV = "FASTCOUNT_FAILPOINT_DROP_AFTER_COMMIT"


def is_permanent(error: BaseException) -> bool:
    """PostgreSQL refused the data itself (it would refuse it again): not worth a retry of the same rows."""
    if isinstance(error, psycopg.errors.UniqueViolation) and error.diag.constraint_name in (LEDGER_PKEY, PARTS_PKEY):
        return False
    return isinstance(error, psycopg.DataError | psycopg.IntegrityError)


@dataclass
class Doubt:
    """An attempt at a part whose COMMIT got no answer (yet): what it wrote (its ledger key tells whether it did)."""

    rows: int
    parked: int


@dataclass
class InFlight:
    writer: str  # the ledger identity: this worker's, or a dead worker's for a batch recovered from its journal
    seq: int
    batch: Any
    rows: int
    units: int
    parts: list[Any] | None = None  # the batch as the transactions it is committed in (rule 6), from its first write
    cut: str = ""  # names this cut of the batch in part ledger keys (rule 6c)
    committed_parts: int = 0
    doubt: Doubt | None = None  # the attempt at parts[committed_parts] whose outcome is not known
    seconds: float = 0.0  # time the committed parts took, retries excluded


def writer_identity(slot: int) -> str:
    """Unique for this process's lifetime across hosts and restarts: host, slot, pid and a random token."""
    return f"{socket.gethostname()}/w{slot}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Lane:
    """One buffer's path to PostgreSQL: its batch in flight, recovered batches to write first, back-off, connection."""

    def __init__(self, flusher: Flusher, buffer: FlushBuffer, phase: float = 0.0) -> None:
        self.flusher = flusher
        self.buffer = buffer
        self.phase = phase  # seconds past a multiple of the interval at which this lane first wakes
        self.pass_started: float | None = None  # time.monotonic() when the last flush pass began
        self.write_seconds = 0.0  # how long the last pass's write of a batch took (0 when it wrote nothing)
        self.writer = f"{flusher.writer}/{buffer.name}"
        self.wake = asyncio.Event()
        buffer.request_flush = self.wake.set
        self.in_flight: InFlight | None = None
        self.parked_items: set[str] = set()  # the dead letters of the batch being bisected (see PARKED_ITEMS)
        self.backstop: asyncio.Timeout | None = None  # of the attempt in progress (rule 5)
        self.backstop_seconds = 0.0
        self.adopted: deque[InFlight] = deque()  # dead workers' batches, written before anything of ours
        self.next_seq = 1
        self.retry_delay = 0.0
        self.failing_since: float | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.last_used = 0.0
        self.last_prune = time.monotonic()

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed and self.failing_since is None

    def backlog_rows(self) -> int:
        """Rows of batches taken but not yet committed (0 while all is well)."""
        return (self.in_flight.rows if self.in_flight else 0) + sum(batch.rows for batch in self.adopted)

    async def run(self) -> None:
        """Flush on every tick until stopped, then until a pass finds nothing left."""
        flusher = self.flusher
        while True:
            await self._wait_until_due()
            try:
                done, took_any = await self.flush_once()
            except Exception:
                # Not a database error (those are handled inside): a bug. Keep the batch, keep trying, never stop
                # flushing silently; the batch stays in flight and the journal keeps it.
                log.exception("event=flush_crashed buffer=%s", self.buffer.name)
                flusher.stats.flush_errors += 1
                self.retry_delay = RETRY_MAX_DELAY
                await self._close()
                continue
            if flusher.stopping and done and not took_any:
                break
        await self._close()

    async def flush_once(self) -> tuple[bool, bool]:
        """(all written, anything was taken). A failed batch stays where it is, for the next pass."""
        took_any = bool(self.adopted)
        while self.adopted:
            if not await self._write(self.adopted[0]):
                return False, took_any
            self.adopted.popleft()
            if not self.adopted:
                self.flusher.adopted_lane_done()
        if self.in_flight is None:
            batch = self.buffer.take()
            if batch is None:
                self.write_seconds = 0.0
                await self._idle_upkeep()
                return True, took_any
            rows, units = self.buffer.describe(batch)
            self.in_flight = InFlight(self.writer, self.next_seq, batch, rows, units)
            if self.buffer.journal is not None:
                self.buffer.journal.take(self.next_seq)
            self.next_seq += 1
        started = time.monotonic()
        if not await self._write(self.in_flight):
            return False, True
        self.write_seconds = time.monotonic() - started
        self.in_flight = None
        self.buffer.acknowledge()
        if self.buffer.journal is not None:
            self.buffer.journal.acknowledge()
        await self._prune_if_due()
        return True, True

    async def _wait_until_due(self) -> None:
        if self.retry_delay:  # back off; an early-flush wake-up must not shorten it
            await asyncio.sleep(self.retry_delay)
            return
        if self.flusher.stopping:
            return
        interval = self.flusher.interval
        if self.pass_started is None:
            now = time.time() - self.phase
            delay = (now // interval + 1) * interval - now
        else:
            lead = min(self.write_seconds, interval / 2)
            delay = self.pass_started + interval - lead - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(self.wake.wait(), delay)
            except TimeoutError:
                pass
        self.wake.clear()
        self.pass_started = time.monotonic()

    async def _write(self, in_flight: InFlight) -> bool:
        """Commit the batch, part after part from the first not committed yet; False when a part failed (the lane
        retries later)."""
        if in_flight.parts is None:
            in_flight.parts = await self._parts(in_flight)
            in_flight.cut = uuid.uuid4().hex[:12]
            if len(in_flight.parts) > 1:
                in_flight.batch = None  # the parts hold every item: not kept twice (~70 MB at 1.4M events)
        while in_flight.committed_parts < len(in_flight.parts):
            if not await self._write_part(in_flight, in_flight.parts):
                return False
        stats = self.flusher.stats
        stats.flushes += 1
        stats.flush_seconds_of(self.buffer.name).observe(in_flight.seconds)
        stats.flush_keys.observe(in_flight.rows)
        return True

    async def _parts(self, in_flight: InFlight) -> list[Any]:
        buffer = self.buffer
        if not buffer.idempotent or not 0 < buffer.transaction_rows < in_flight.rows:
            return [in_flight.batch]
        parts = []
        for part in buffer.parts(in_flight.batch, buffer.transaction_rows):
            parts.append(part)
            await asyncio.sleep(0)  # a part of 100,000 events takes ~12 ms to build
        log.info(
            "event=flush_in_parts writer=%s seq=%d rows=%d parts=%d", in_flight.writer, in_flight.seq, in_flight.rows,
            len(parts),
        )  # fmt: skip
        return parts or [in_flight.batch]

    async def _write_part(self, in_flight: InFlight, parts: list[Any]) -> bool:
        flusher = self.flusher
        index = in_flight.committed_parts
        started = time.perf_counter()
        timeout = self._timeout_for(in_flight.rows if len(parts) == 1 else self.buffer.transaction_rows)
        self.backstop_seconds = BACKSTOP_TIMEOUTS * timeout + BACKSTOP_MARGIN
        try:
            # the statement timeout's backstop (rule 5)
            async with asyncio.timeout(self.backstop_seconds) as self.backstop:
                conn = await self._connection()
                if index == 0 and len(parts) > 1 and in_flight.writer != self.writer and in_flight.doubt is None:
                    index = in_flight.committed_parts = await self._first_part_to_write(conn, in_flight, parts)
                rows, parked = await self._commit(conn, in_flight, parts[index], index, len(parts), timeout)
            if flusher.drop_after_commits > 0:
                flusher.drop_after_commits -= 1
                raise psycopg.OperationalError("injected failure: connection lost after COMMIT")
        except BaseException as error:
            if in_flight.doubt is None:  # it did not reach COMMIT: rolled back
                self.buffer.transaction_ended(False)
            if not isinstance(error, psycopg.Error | OSError | TimeoutError):
                raise
            await self._close()
            flusher.stats.flush_errors += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.retry_delay = min(RETRY_MAX_DELAY, max(RETRY_FIRST_DELAY, self.retry_delay * 2))
            flusher.stats.flush_retries += 1
            log.warning(
                "event=flush_failed writer=%s seq=%d rows=%d part=%d/%d retry_in=%.1fs error=%r",
                in_flight.writer,
                in_flight.seq,
                in_flight.rows,
                index + 1,
                len(parts),
                self.retry_delay,
                str(error).strip() or type(error).__name__,
            )
            return False
        finally:
            self.backstop = None
            self.parked_items = set()
        in_flight.doubt = None
        self.buffer.transaction_ended(True)
        in_flight.committed_parts += 1
        in_flight.seconds += time.perf_counter() - started
        if self.failing_since is not None:
            log.info("event=flush_recovered writer=%s after=%.1fs", self.writer, time.monotonic() - self.failing_since)
        self.failing_since = None
        self.retry_delay = 0.0
        self.last_used = time.monotonic()
        flusher.stats.flushed_rows += rows
        if parked:
            flusher.stats.dead_letters += parked
        return True

    async def _first_part_to_write(
        self, conn: psycopg.AsyncConnection[Any], in_flight: InFlight, parts: list[Any]
    ) -> int:
        """Rule 6e: a batch replayed from a dead worker's journal starts at its last part if the dead worker had
        committed it whole."""
        if not await (await conn.execute(BATCH_RECORDED, (in_flight.writer, in_flight.seq))).fetchone():
            return 0
        log.warning(
            "event=recovered_batch_committed_whole writer=%s seq=%d parts_skipped=%d", in_flight.writer,
            in_flight.seq, len(parts) - 1,
        )  # fmt: skip
        return len(parts) - 1

    def _timeout_for(self, rows: int) -> float:
        """Rule 5: --flush-timeout, or longer for a transaction whose size alone needs it."""
        return max(self.flusher.flush_timeout, rows / ROWS_PER_TIMEOUT_SECOND)

    async def _commit(
        self, conn: psycopg.AsyncConnection[Any], in_flight: InFlight, part: Any, index: int, parts: int, timeout: float
    ) -> tuple[int, int]:
        """One transaction: a part of the batch (the whole batch, unless rule 6 cut it) with its ledger key (rule 6c).
        (rows written, units parked as dead letters)."""
        try:
            async with conn.transaction():
                await self._begin(conn, in_flight, index, parts, timeout)
                rows = await self.buffer.write(conn, part)
                in_flight.doubt = Doubt(rows, 0)  # from here until COMMIT answers, the outcome is unknown
            return rows, 0
        except (psycopg.DataError, psycopg.IntegrityError) as error:
            if not is_permanent(error):  # the ledger key of this very batch or part: it committed before
                if index == parts - 1:
                    log.warning("event=batch_already_committed writer=%s seq=%d", in_flight.writer, in_flight.seq)
                else:
                    log.warning(
                        "event=part_already_committed writer=%s seq=%d part=%d/%d", in_flight.writer, in_flight.seq,
                        index + 1, parts,
                    )  # fmt: skip
                doubt = in_flight.doubt  # an attempt of ours, if its COMMIT got no answer: what it wrote
                return (doubt.rows, doubt.parked) if doubt is not None else (0, 0)
        self.buffer.transaction_ended(False)
        # PostgreSQL refused some of the data. Again, in one transaction, item by item where it must.
        self._progress()
        log.warning(
            "event=flush_refused writer=%s seq=%d rows=%d action=isolate",
            in_flight.writer,
            in_flight.seq,
            in_flight.rows,
        )
        async with conn.transaction():
            await self._begin(conn, in_flight, index, parts, timeout)
            cursor = await conn.execute(PARKED_ITEMS, (in_flight.writer, in_flight.seq))
            self.parked_items = {str(item) for (item,) in await cursor.fetchall()}
            rows, parked = await self._write_isolating(conn, in_flight, part)
            in_flight.doubt = Doubt(rows, parked)
        return rows, parked

    async def _begin(
        self, conn: psycopg.AsyncConnection[Any], in_flight: InFlight, index: int, parts: int, timeout: float
    ) -> None:
        """A part's transaction starts with its ledger key (rule 6c). Once that is in, an earlier attempt in doubt
        did not commit (its key would be there, or this insert would have waited for it)."""
        if timeout > self.flusher.flush_timeout:
            await conn.execute(EXTEND_TIMEOUT, {"ms": str(int(timeout * 1000))})
        if index == parts - 1:
            ledger = {
                "writer": in_flight.writer,
                "seq": in_flight.seq,
                "keys": in_flight.rows,
                "total": in_flight.units,
            }
            await conn.execute(RECORD_IDEMPOTENT_BATCH if self.buffer.idempotent else RECORD_BATCH, ledger)
        else:
            await conn.execute(RECORD_PART, (in_flight.writer, in_flight.seq, in_flight.cut, index))
        if in_flight.doubt is not None:
            self._forget(in_flight)

    def _forget(self, in_flight: InFlight) -> None:
        """The attempt in doubt did not commit: what the buffer derived from its writes goes."""
        in_flight.doubt = None
        self.buffer.transaction_ended(False)

    async def _write_isolating(
        self, conn: psycopg.AsyncConnection[Any], in_flight: InFlight, batch: Any
    ) -> tuple[int, int]:
        try:
            async with conn.transaction():  # a savepoint: a refused part rolls back alone
                rows = await self.buffer.write(conn, batch)
            self._progress()
            return rows, 0
        except (psycopg.DataError, psycopg.IntegrityError) as error:
            if not is_permanent(error):
                raise
            self._progress()  # refused is an answer too
            parts = self.buffer.split(batch)
            if len(parts) > 1:
                rows = parked = 0
                for part in parts:
                    part_rows, part_parked = await self._write_isolating(conn, in_flight, part)
                    rows += part_rows
                    parked += part_parked
                return rows, parked
            parked = await self._park(conn, in_flight, batch, error)
            self._progress()
            return 0, parked

    def _progress(self) -> None:
        """A statement of the bisection was answered: the backstop counts from now (rule 5)."""
        if self.backstop is not None and not self.backstop.expired():
            self.backstop.reschedule(asyncio.get_running_loop().time() + self.backstop_seconds)

    async def _park(
        self, conn: psycopg.AsyncConnection[Any], in_flight: InFlight, batch: Any, error: psycopg.Error
    ) -> int:
        items = [item for item in dict.fromkeys(self.buffer.dead_letters(batch)) if item not in self.parked_items]
        if not items:
            return 0  # parked before (a part written again): counted then
        self.parked_items.update(items)  # this transaction's: read again from the table by the next bisection
        sqlstate = error.sqlstate or ""
        message = str(error).strip() or type(error).__name__
        await conn.execute(
            RECORD_DEAD_LETTER,
            {
                "feature": self.buffer.name,
                "writer": in_flight.writer,
                "seq": in_flight.seq,
                "sqlstate": sqlstate,
                "error": message,
                "items": items,
            },
        )
        units = self.buffer.dead_letter_units(batch)
        log.error(
            "event=dead_letter buffer=%s writer=%s seq=%d units=%d sqlstate=%s error=%r items=%.300s",
            self.buffer.name,
            in_flight.writer,
            in_flight.seq,
            units,
            sqlstate,
            message,
            ",".join(items),
        )
        return units

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = await connect(self.flusher.dsn, statement_timeout=self.flusher.flush_timeout)
            await self.flusher.migrate_once(self.conn)
            self.last_used = time.monotonic()
        return self.conn

    async def connect_early(self) -> None:
        """At start: so `connected` tells the truth before the first flush. A failure here is only logged."""
        try:
            async with asyncio.timeout(self.flusher.flush_timeout):
                await self._connection()
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.warning("event=flush_connect_failed buffer=%s error=%r", self.buffer.name, str(error).strip())
            await self._close()

    async def _idle_upkeep(self) -> None:
        if time.monotonic() - self.last_used < PING_WHEN_IDLE_FOR:
            return
        try:
            async with asyncio.timeout(self.flusher.flush_timeout):
                await (await self._connection()).execute("SELECT 1")
            self.last_used = time.monotonic()
        except (psycopg.Error, OSError, TimeoutError):
            await self._close()

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                async with asyncio.timeout(1.0):
                    await conn.close()
            except (psycopg.Error, OSError, TimeoutError):
                pass

    async def _prune_if_due(self) -> None:
        now = time.monotonic()
        if now - self.last_prune < PRUNE_EVERY_SECONDS or self.conn is None:
            return
        self.last_prune = now
        try:
            await self.conn.execute(PRUNE_OWN_BATCHES, (self.writer, self.next_seq - 1))
        except psycopg.Error as error:
            log.warning("event=ledger_prune_failed writer=%s error=%r", self.writer, str(error).strip())
            await self._close()


class Flusher:
    """The lanes of one worker, and what they share: DSN, interval, timeouts, stats, the writer identity."""

    def __init__(
        self,
        dsn: str,
        buffers: Sequence[FlushBuffer],
        interval: float,
        writer: str,
        stats: WorkerStats,
        schema: Sequence[str] = (),
        flush_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.interval = interval
        self.writer = writer
        self.stats = stats
        self.schema = schema
        self.flush_timeout = flush_timeout
        self.stopping = False
        self.migrated = False
        self.drop_after_commits = int(os.environ.get(FAILPOINT_ENV, "0") or 0)
        # Phases spread the lanes over the interval: 1/4, 2/4, 3/4 of it for three buffers.
        self.lanes = {
            buffer.name: Lane(self, buffer, interval * (index + 1) / (len(buffers) + 1))
            for index, buffer in enumerate(buffers)
        }
        self.on_adopted_written: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return all(lane.connected for lane in self.lanes.values())

    @property
    def failing(self) -> bool:
        return any(lane.failing_since is not None for lane in self.lanes.values())

    def backlog_rows(self) -> int:
        return sum(lane.backlog_rows() for lane in self.lanes.values())

    def adopt(self, section: str, writer: str, seq: int, records: Sequence[bytes]) -> None:
        """A batch a dead worker left in its journal: written under its identity, before anything of ours."""
        lane = self.lanes.get(section)
        if lane is None:
            raise LookupError(f"journal section {section!r} has no buffer in this worker")
        batch = lane.buffer.replay(records)
        rows, units = lane.buffer.describe(batch)
        log.warning("event=journal_recovered writer=%s seq=%d rows=%d units=%d", writer, seq, rows, units)
        lane.adopted.append(InFlight(writer, seq, batch, rows, units))
        lane.wake.set()

    def adopted_lane_done(self) -> None:
        if self.on_adopted_written is not None and not any(lane.adopted for lane in self.lanes.values()):
            self.on_adopted_written()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(lane.run(), name=f"flush-{name}") for name, lane in self.lanes.items()]

    async def connect_early(self) -> None:
        await asyncio.gather(*(lane.connect_early() for lane in self.lanes.values()))

    async def stop(self) -> None:
        """Flush everything, then return (the caller bounds how long it waits: the master's graceful timeout)."""
        self.stopping = True
        for lane in self.lanes.values():
            lane.wake.set()
        await asyncio.gather(*self._tasks)

    async def migrate_once(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self.migrated:
            await migrate_async(conn, self.schema)
            self.migrated = True
