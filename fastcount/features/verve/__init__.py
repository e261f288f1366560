"""GET /api/verve/accept: unique ids per time window, reported exactly once per window across every instance sharing
the database, then logged, published to Kafka (an outbox) and sent to the window's callback endpoints.

The request path (accept.py) only parses, deduplicates in memory and journals; the flusher writes ids and endpoints;
one background job per worker, on its own connection, runs the reporter and the callbacks in turn; with Kafka, a second
job on its own connection runs the outbox (so its leases are renewed however long a report takes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from time import time as now
from typing import Any

import psycopg

from fastcount.features.base import Feature, FeatureContext, FeatureMetric, FlushBuffer
from fastcount.features.verve.accept import FAILED, PendingIds, parse_endpoint, parse_id, parse_query
from fastcount.features.verve.callbacks import OUTCOMES, Callbacks
from fastcount.features.verve.outbox import KafkaOutbox
from fastcount.features.verve.reporter import Reporter
from fastcount.features.verve.schema import (
    KAFKA_TOPIC_KEPT,
    KEEP_KAFKA_TOPIC,
    KEEP_WINDOW_SECONDS,
    SCHEMA,
    WINDOW_SECONDS,
)
from fastcount.features.verve.settings import DEFAULT_WINDOW, VerveSettings
from fastcount.server.responses import Response
from fastcount.server.routing import Route
from fastcount.settings import Settings
from fastcount.store.database import connect
from fastcount.store.flusher import writer_identity

log = logging.getLogger(__name__)

JOB_ERROR_LOG_EVERY = 30.0
JOB_MAX_DELAY = 5.0
Step = Callable[[psycopg.AsyncConnection[Any]], Coroutine[Any, Any, None]]


class VerveFeature(Feature):
    name = "verve"
    settings_class = VerveSettings
    schema = SCHEMA

    def __init__(self, context: FeatureContext) -> None:
        super().__init__(context)
        settings = context.settings
        self.verve = context.section(VerveSettings)
        self.ids = PendingIds(
            self.verve.verve_window, settings.max_pending_keys, self.verve.verve_max_endpoints, settings.flush_max_keys
        )
        self.failed = 0
        self.me = writer_identity(context.slot) + "/verve"
        self.reporter: Reporter | None = None
        self.outbox: KafkaOutbox | None = None
        self.callbacks: Callbacks | None = None
        self.endpoints_dropped_logged = 0

    @classmethod
    async def check_database(cls, conn: psycopg.AsyncConnection[Any], settings: Settings) -> str | None:
        """Windows of two sizes in one database cannot be reported exactly (nor aligned: a reload from 20 to 30 s
        reported a window that never held ids and left two that did unreported), so its first size stays. Likewise
        the Kafka topic: an instance with another one published the windows it claimed there."""
        verve = settings.section(VerveSettings)
        window = verve.verve_window
        await conn.execute(KEEP_WINDOW_SECONDS, (window,))
        row = await (await conn.execute(WINDOW_SECONDS)).fetchone()
        kept = int(row[0]) if row else window
        if kept != window:
            return (
                f"{Settings.flag_name('verve_window')} {window}"
                f"{' (the default)' if window == DEFAULT_WINDOW else ''} differs from this database's window, {kept} s"
                f" (kept since its first start; every instance sharing the database uses it): start with"
                f" {Settings.flag_name('verve_window')} {kept}, or see 'Changing the window' in the README"
            )
        if verve.kafka_bootstrap:  # a report goes to one topic, whichever instance publishes it
            await conn.execute(KEEP_KAFKA_TOPIC, (verve.kafka_topic,))
            row = await (await conn.execute(KAFKA_TOPIC_KEPT, (verve.kafka_topic,))).fetchone()
            if row is not None and not row[0]:
                return (
                    f"{Settings.flag_name('kafka_topic')} {verve.kafka_topic} differs from the topic this database's"
                    " reports are published to (kept since an instance first used Kafka with it; every instance"
                    " sharing the database publishes there): see 'Kafka' in the README"
                )
        return None

    def routes(self) -> list[Route]:
        return [Route(b"GET", b"/api/verve/accept", self.handle_accept, name="verve_accept")]

    def buffers(self) -> list[FlushBuffer]:
        return [self.ids]

    def handle_accept(self, path: bytes, query: bytes, body: bytes) -> Response:
        # The hot path: no I/O, no logging, no locks; counts are plain ints (503s are counted by the buffer).
        # `id=<digits>` alone, inline: digits hold no '&', and under 19 of them are within range.
        digits = query[3:]
        if query[:3] == b"id=" and digits.isdigit() and len(digits) < 19:
            return self.ids.add_id(int(digits), digits, now())
        return self._accept_general(query)

    def _accept_general(self, query: bytes) -> Response:
        raw_id, raw_endpoint, well_formed = parse_query(query)
        if not well_formed or raw_id is None or (ident := parse_id(raw_id)) is None:
            self.failed += 1
            return FAILED
        if raw_endpoint is None:
            return self.ids.add_id(ident, raw_id, now())
        endpoint = parse_endpoint(raw_endpoint)
        if endpoint is None:
            self.failed += 1
            return FAILED
        return self.ids.add(ident, endpoint, now())

    # -- background ---------------------------------------------------------------------------------------------------

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [self.report_and_notify]
        if self.verve.kafka_bootstrap:
            jobs.append(self.publish)
        return jobs

    def log_path(self) -> str:
        return self.verve.verve_log or str(Path(self.context.settings.data_dir) / "verve.log")

    async def report_and_notify(self) -> None:
        """One loop, one connection: report due windows, then call endpoints. Each step is built and run on its own:
        a step that fails (a database error, a bad --verve-log path, a bug) is logged at most once per
        JOB_ERROR_LOG_EVERY seconds, the loop backs off and tries again; the other step goes on. A database error (or
        a connection left inside a transaction) gets a new connection."""
        interval = min(1.0, max(0.1, self.verve.verve_window / 8))
        steps: list[tuple[str, Step]] = [("report", self._report_step), ("callbacks", self._callbacks_step)]
        await self._run_job(steps, interval, self._finish_callbacks)

    async def publish(self) -> None:
        """The Kafka outbox on its own loop and connection, every quarter lease (at most a second): the publish
        leases of messages in the producer are renewed however long a report or a callback step takes."""
        interval = min(1.0, max(0.1, self.verve.verve_lease / 4))
        await self._run_job([("kafka", self._outbox_step)], interval, self._finish_outbox)

    async def _report_step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.reporter is None:
            verve = self.verve
            self.reporter = Reporter(
                self.me, verve.verve_window, verve.grace(self.context.settings.flush_interval), verve.verve_lease,
                bool(verve.kafka_bootstrap), self.log_path(), verve.verve_retention, verve.verve_report_retention,
            )  # fmt: skip
        await self.reporter.step(conn)

    async def _outbox_step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.outbox is None:
            verve = self.verve
            self.outbox = KafkaOutbox(self.me, verve.kafka_bootstrap, verve.kafka_topic, verve.verve_lease)
        await self.outbox.step(conn)

    async def _callbacks_step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.callbacks is None:
            verve = self.verve
            self.callbacks = Callbacks(
                self.me, verve.verve_callback_method, verve.allow_list, verve.verve_callback_timeout,
                verve.verve_callback_concurrency,
            )  # fmt: skip
        await self.callbacks.step(conn)

    async def _run_job(
        self,
        steps: list[tuple[str, Step]],
        interval: float,
        finish: Callable[[psycopg.AsyncConnection[Any] | None], Coroutine[Any, Any, None]],
    ) -> None:
        settings = self.context.settings
        conn: psycopg.AsyncConnection[Any] | None = None
        delay = 0.0
        last_error_log: dict[str, float] = {}
        try:
            while True:
                await asyncio.sleep(delay or interval)
                failed = False
                for what, step in steps:
                    try:
                        async with asyncio.timeout(settings.flush_timeout + 5):
                            if conn is None or conn.closed:
                                conn = await connect(self.context.dsn, statement_timeout=settings.flush_timeout)
                            await step(conn)
                    except Exception as error:  # a background job must outlive any one failure
                        failed = True
                        self.context.stats.background_job_failures += 1  # what operators alert on (README)
                        retry = min(JOB_MAX_DELAY, max(interval, delay * 2))
                        if time.monotonic() - last_error_log.get(what, -JOB_ERROR_LOG_EVERY) >= JOB_ERROR_LOG_EVERY:
                            last_error_log[what] = time.monotonic()
                            if isinstance(error, (psycopg.Error, TimeoutError)):
                                log.warning("event=verve_job_failed step=%s retry_in=%.1fs error=%r", what, retry,
                                            str(error).strip())  # fmt: skip
                            else:
                                log.exception("event=verve_job_failed step=%s retry_in=%.1fs error=%r", what, retry,
                                              f"{type(error).__name__}: {error}")  # fmt: skip
                        if conn is not None and (
                            isinstance(error, (psycopg.Error, TimeoutError))
                            or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                        ):
                            await _close(conn)
                            conn = None
                delay = min(JOB_MAX_DELAY, max(interval, delay * 2)) if failed else 0.0
                self._log_dropped_endpoints()
        finally:
            try:
                await finish(conn)
            except Exception as error:
                log.warning("event=verve_stop_incomplete error=%r", f"{type(error).__name__}: {error}")
            finally:
                if conn is not None:
                    await _close(conn)

    async def _finish_outbox(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """At stop: let queued Kafka messages be delivered and record what was."""
        if self.outbox is not None:
            await self.outbox.close()
            if conn is not None and not conn.closed:
                async with asyncio.timeout(5):
                    await self.outbox.record_deliveries(conn)

    async def _finish_callbacks(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """At stop: cancel calls in progress, record them (cancelled) and release the claims of those not started."""
        if self.callbacks is not None:
            await self.callbacks.close()
            if conn is not None and not conn.closed:
                async with asyncio.timeout(5):
                    await self.callbacks.record(conn)

    def _log_dropped_endpoints(self) -> None:
        dropped = self.ids.endpoints_dropped
        if dropped != self.endpoints_dropped_logged:
            log.warning(
                "event=verve_endpoints_dropped dropped=%d total=%d max_per_window=%d",
                dropped - self.endpoints_dropped_logged, dropped, self.verve.verve_max_endpoints,
            )  # fmt: skip
            self.endpoints_dropped_logged = dropped

    # -- metrics ------------------------------------------------------------------------------------------------------

    def metrics(self) -> list[FeatureMetric]:
        ids = self.ids
        metrics = [
            FeatureMetric("verve_requests", "counter", "verve accept answers by result", ids.accepted,
                          (("result", "accepted"),)),
            FeatureMetric("verve_requests", "counter", "verve accept answers by result", ids.duplicates,
                          (("result", "duplicate"),)),
            FeatureMetric("verve_requests", "counter", "verve accept answers by result", self.failed + ids.refused,
                          (("result", "failed"),)),
            FeatureMetric("verve_endpoints_dropped", "counter", "endpoints past --verve-max-endpoints",
                          ids.endpoints_dropped),
            FeatureMetric("verve_pending_ids", "gauge", "ids in memory not yet flushed",
                          ids.pending_count + ids.unacknowledged),
            FeatureMetric("verve_reports", "counter", "window reports made by this worker",
                          self.reporter.reports if self.reporter else 0),
            FeatureMetric("verve_kafka_lag_seconds", "gauge", "age of the oldest report waiting to be published",
                          self.reporter.kafka_lag_seconds if self.reporter else 0.0),
        ]  # fmt: skip
        if self.outbox is not None:
            metrics += [
                FeatureMetric("verve_kafka_published", "counter", "reports the broker acknowledged",
                              self.outbox.published),
                FeatureMetric("verve_kafka_failures", "counter", "failed report deliveries", self.outbox.failures),
            ]  # fmt: skip
        if self.callbacks is not None:
            metrics += [
                FeatureMetric("verve_callbacks", "counter", "callbacks by outcome", self.callbacks.by_outcome[outcome],
                              (("outcome", outcome),))
                for outcome in OUTCOMES
            ]  # fmt: skip
        return metrics


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        async with asyncio.timeout(1.0):
            await conn.close()
    except (psycopg.Error, OSError, TimeoutError):
        pass


__all__ = ["VerveFeature"]
