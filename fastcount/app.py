"""The composition: the list of features, and the one place that wires a feature's routes, buffers, schema, metrics
and readiness into a worker. Adding a workload is a new module in fastcount/features/ and one line in FEATURES.

The server (fastcount/server/) never imports this module by name: the master tells each worker which application
to load (`APPLICATION`), as gunicorn is told an app, and the worker drives it through `server.worker.Application`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from fastcount.features.base import Feature, FeatureContext, FeatureMetric, FlushBuffer
from fastcount.features.events import EventsFeature
from fastcount.features.health import Health
from fastcount.features.increment import IncrementFeature
from fastcount.features.verve import VerveFeature
from fastcount.observability.stats import WorkerStats
from fastcount.server.routing import Route
from fastcount.settings import Settings
from fastcount.store.database import KEEPALIVES, bound_session, connect
from fastcount.store.flusher import Flusher, writer_identity
from fastcount.store.journal import JournalFile, recover

log = logging.getLogger(__name__)

APPLICATION = "fastcount.app:WorkerApp"  # what the master tells workers to load

FEATURES: list[type[Feature]] = [
    IncrementFeature,
    EventsFeature,
    VerveFeature,
]


async def check_database(dsn: str, settings: Settings) -> list[str]:
    """Every feature's reason, if any, why `settings` cannot serve against the database at `dsn`."""
    async with await connect(dsn) as conn:
        found = [await feature.check_database(conn, settings) for feature in FEATURES]
    return [problem for problem in found if problem]


def settings_sections() -> list[type]:
    """The features' settings classes, for the CLI, the env file and reloads."""
    return [feature.settings_class for feature in FEATURES if feature.settings_class is not None]


def schema() -> list[str]:
    """Every feature's DDL, in FEATURES order (the core's own tables come first, from store/database.py)."""
    return [statement for feature in FEATURES for statement in feature.schema]


class WorkerApp:
    """Everything one worker runs besides the HTTP server: the features, their flusher lanes, journal and jobs."""

    def __init__(self, settings: Settings, dsn: str, slot: int, stats: WorkerStats) -> None:
        self.settings = settings
        self.read_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=2,
            open=False,
            timeout=2.0,
            kwargs={"autocommit": True, "connect_timeout": 5, **KEEPALIVES},
            check=AsyncConnectionPool.check_connection,
            configure=self._configure_read_connection,
        )
        context = FeatureContext(settings, self.read_pool, stats, slot, dsn)
        self.features = [feature(context) for feature in FEATURES]
        self.buffers: list[FlushBuffer] = [buffer for feature in self.features for buffer in feature.buffers()]
        self.flusher = Flusher(
            dsn, self.buffers, settings.flush_interval, writer_identity(slot), stats, schema(), settings.flush_timeout
        )
        self.health = Health(self.read_pool, self.problems)
        self.journal: JournalFile | None = None

    def routes(self) -> list[Route]:
        return [*self.health.routes(), *(route for feature in self.features for route in feature.routes())]

    def problems(self) -> list[str]:
        return [problem for feature in self.features for problem in feature.problems()]

    # -- the crash journal ------------------------------------------------------------------------------------------

    def open_journal(self, fd: int) -> None:
        """Journal every buffer's accepted requests in the master's memfd, one section per buffer."""
        self.journal = JournalFile(
            fd, self.settings.crash_journal_mb << 20, [buffer.name for buffer in self.buffers], self.writer_of
        )
        for buffer in self.buffers:
            buffer.journal = self.journal.sections[buffer.name]

    def writer_of(self, buffer_name: str) -> str:
        return self.flusher.lanes[buffer_name].writer

    async def _configure_read_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A read (GET /metrics over months, a counter) is bounded: a query held by a lock or a slow plan answers 503
        after --query-timeout instead of holding its client and a pool connection forever."""
        await bound_session(conn, self.settings.query_timeout)

    def adopt_journals(self, fds: Sequence[int]) -> int:
        """Queue what dead workers' journals hold, under their ledger identities; returns the batches queued."""
        batches = [batch for fd in fds for batch in recover(fd)]
        for batch in batches:
            self.flusher.adopt(batch.section, batch.writer, batch.seq, batch.records)
        return len(batches)

    # -- life cycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.read_pool.open(wait=False)
        await self.flusher.connect_early()
        self.flusher.start()

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [job for feature in self.features for job in feature.background()]

    async def stop(self) -> None:
        """Flush everything, then release the connections."""
        await self.flusher.stop()
        for feature in self.features:
            await feature.close()
        await self.read_pool.close()

    # -- metrics ----------------------------------------------------------------------------------------------------

    def metrics(self) -> list[FeatureMetric]:
        flusher = self.flusher
        core = [
            FeatureMetric("postgres_connected", "gauge", "1 when every flusher lane reaches PostgreSQL",
                          int(flusher.connected)),
            FeatureMetric("flush_backlog_keys", "gauge", "rows of batches that failed to flush and are being retried",
                          flusher.backlog_rows() if flusher.failing else 0),
        ]  # fmt: skip
        for buffer in self.buffers:
            if buffer.journal is not None:
                core.append(
                    FeatureMetric("journal_used_bytes", "gauge", "bytes of the crash journal's active region in use",
                                  buffer.journal.used_bytes(), (("buffer", buffer.name),))
                )  # fmt: skip
        return core + [metric for feature in self.features for metric in feature.metrics()]
