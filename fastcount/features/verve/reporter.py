"""Window reports, exactly once across every process sharing the database: make sure a row exists for each due
window, claim one with a lease (`FOR UPDATE SKIP LOCKED`), count its ids, record the count (the first claimer to
finish, only once: `WHERE unique_ids IS NULL ... RETURNING`), then the one that recorded writes the one report line. A
claimer that dies leaves a lease that expires; another process then claims the window and reports it; a claimer slower
than its lease still records if it finishes first. The master takes no part (it opens no database connection).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from fastcount.features.verve.schema import (
    CLAIM_WINDOW,
    COUNT_IDS,
    DATABASE_NOW,
    DELETE_OLD_ENDPOINTS,
    DELETE_OLD_IDS,
    DELETE_OLD_REPORTS,
    ENSURE_WINDOWS,
    FIRST_WINDOW_SOURCES,
    OLDEST_UNPUBLISHED,
    RECORD_REPORT,
    RETENTION_LOCK,
    TRY_RETENTION_LOCK,
)

log = logging.getLogger(__name__)

# Test-only: a path; the first claimer (of any process) that finds no file there creates it and dies at once, as a
# SIGKILL would, leaving its claim to expire. Unset in production.
FAILPOINT_DIE_AFTER_CLAIM = "FASTCOUNT_VERVE_FAILPOINT_DIE_AFTER_CLAIM"
RETENTION_EVERY = 60.0
MAX_CLAIMS_PER_STEP = 50


def iso(window_start: int) -> str:
    return datetime.fromtimestamp(window_start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_logger(path: str) -> logging.Logger:
    """The report log: one line per window, through logging, in its own file (appends of one line are atomic, so the
    workers of one instance share it)."""
    # One logger per file: a process-wide one kept the first path it was given, so a later --verve-log (a reload, or
    # a second reporter in the same process, as in the tests) wrote its lines to the old file.
    logger = logging.getLogger(f"fastcount.verve.reports[{Path(path).resolve()}]")
    if not logger.handlers:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Reporter:
    def __init__(self, me: str, window_seconds: int, grace: float, lease: float, kafka: bool, log_path: str,
                 retention: float, report_retention: float) -> None:  # fmt: skip
        self.me = me
        self.window_seconds = window_seconds
        self.grace = grace
        self.lease = lease
        self.kafka = kafka
        self.lines = report_logger(log_path)
        self.retention = retention
        self.report_retention = report_retention
        self.ensured_through: int | None = None  # the last window start known to have a row
        self.first_window: int | None = None
        self.last_retention = 0.0
        self.reports = 0  # made by this process (a counter)
        self.kafka_lag_seconds = 0.0  # age of the oldest report waiting for Kafka, whoever is to publish it
        self.failpoint = os.environ.get(FAILPOINT_DIE_AFTER_CLAIM, "")

    def last_due(self, now: float) -> int:
        """The start of the newest window that closed at least `grace` seconds ago."""
        seconds = self.window_seconds
        return int((now - self.grace) // seconds) * seconds - seconds

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        """Report every due window nobody else holds; returns the windows this process reported. Due-ness is
        computed from the database's clock (one for the whole cluster): an instance whose clock runs fast cannot report
        windows early for everyone."""
        db_now = float((await (await conn.execute(DATABASE_NOW)).fetchone() or (time.time(),))[0])
        last = self.last_due(db_now)
        await self._ensure_windows(conn, last, db_now)
        reported: list[int] = []
        for _ in range(MAX_CLAIMS_PER_STEP):
            row = await (
                await conn.execute(CLAIM_WINDOW, {"me": self.me, "lease": self.lease, "last": last})
            ).fetchone()
            if row is None:
                break
            window, seconds, claims = int(row[0]), int(row[1]), int(row[2])
            if claims > 1:
                log.warning("event=verve_window_taken_over window_start=%s claims=%d", iso(window), claims)
            self._failpoint()
            count = int((await (await conn.execute(COUNT_IDS, (window,))).fetchone() or (0,))[0])
            values = {"count": count, "me": self.me, "kafka": self.kafka, "window": window}
            recorded = await (await conn.execute(RECORD_REPORT, values)).fetchone()
            if recorded is None:
                log.warning("event=verve_already_reported window_start=%s", iso(window))
                continue
            self.reports += 1
            reported.append(window)
            self.lines.info("window_start=%s window_seconds=%d unique_ids=%d", iso(window), seconds, count)
        await self._retention_if_due(conn, db_now)
        # Here, not in the outbox: every instance reports, so the backlog shows even when no instance with Kafka runs
        row = await (await conn.execute(OLDEST_UNPUBLISHED)).fetchone()
        self.kafka_lag_seconds = float(row[0]) if row else 0.0
        return reported

    async def _ensure_windows(self, conn: psycopg.AsyncConnection[Any], last: int, now: float) -> None:
        seconds = self.window_seconds
        if self.first_window is None:
            first_start, first_id_window, newest = await (await conn.execute(FIRST_WINDOW_SOURCES)).fetchone()  # type: ignore[misc]
            candidates = [int(value) for value in (first_start, first_id_window) if value is not None]
            first = min(candidates) if candidates else int(now)
            first = int(first // seconds) * seconds
            # Never further back than reports are kept; and what is already there need not be inserted again.
            first = max(first, int((now - self.report_retention) // seconds) * seconds)
            self.first_window = first
            self.ensured_through = first - seconds if newest is None else max(first - seconds, int(newest))
        assert self.ensured_through is not None
        start = self.ensured_through + seconds
        if start > last:
            return
        await conn.execute(ENSURE_WINDOWS, {"seconds": seconds, "first": start, "last": last})
        self.ensured_through = last

    def _failpoint(self) -> None:
        if self.failpoint:
            try:
                os.close(os.open(self.failpoint, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(70)

    async def _retention_if_due(self, conn: psycopg.AsyncConnection[Any], now: float) -> None:
        if time.monotonic() - self.last_retention < RETENTION_EVERY:
            return
        self.last_retention = time.monotonic()
        async with conn.transaction():
            row = await (await conn.execute(TRY_RETENTION_LOCK, (RETENTION_LOCK,))).fetchone()
            if not row or not row[0]:
                return  # another process is at it
            ids_cutoff = int(now - self.retention)
            report_cutoff = int(now - self.report_retention)
            ids = (await conn.execute(DELETE_OLD_IDS, {"cutoff": ids_cutoff})).rowcount
            endpoints = (await conn.execute(DELETE_OLD_ENDPOINTS, (report_cutoff,))).rowcount
            reports = (await conn.execute(DELETE_OLD_REPORTS, (report_cutoff,))).rowcount
        if ids or endpoints or reports:
            log.info("event=verve_retention ids=%d endpoints=%d reports=%d", ids, endpoints, reports)
