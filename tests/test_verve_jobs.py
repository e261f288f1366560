"""The verve background steps against a real PostgreSQL, driven directly (no server): callbacks at stop, report
recording under a lost lease, due-ness from the database's clock, the callback resolver."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fastcount.app import settings_sections
from fastcount.features.verve import VerveFeature
from fastcount.features.verve.callbacks import Callbacks, CheckedResolver, Outcome, TargetRefused
from fastcount.features.verve.outbox import KafkaOutbox, OnePerInterval
from fastcount.features.verve.reporter import Reporter
from fastcount.features.verve.schema import SCHEMA
from fastcount.features.verve.settings import parse_allow_list
from fastcount.settings import Settings

from conftest import Database
from verve_support import own_database, report_lines


@pytest.fixture
def db(database: Database) -> Iterator[Database]:
    with own_database(database) as fresh:
        for statement in SCHEMA:
            fresh.query(statement)
        yield fresh


async def _connect(db: Database) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def test_callbacks_claim_only_what_starts_and_a_stop_loses_no_claim(db: Database, silent_port: int) -> None:
    endpoints = [f"http://127.0.0.1:{silent_port}/{n}" for n in range(3)]
    db.query("INSERT INTO verve_windows (window_start, window_seconds, unique_ids) VALUES (100, 10, 5)")
    for endpoint in endpoints:
        db.query("INSERT INTO verve_endpoints (window_start, endpoint) VALUES (100, %s)", (endpoint,))

    async def run() -> None:
        conn = await _connect(db)
        try:
            # One stopped while its call is in progress, one stopped right after its claim (never started).
            callbacks = Callbacks("me", "get", parse_allow_list(""), 60.0, 1)
            await callbacks.step(conn)
            await asyncio.sleep(0.5)
            await callbacks.close()
            await callbacks.record(conn)
            callbacks = Callbacks("me", "get", parse_allow_list(""), 60.0, 1)
            await callbacks.step(conn)
            await callbacks.close()
            await callbacks.record(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    rows = db.query("SELECT endpoint, attempted_at IS NOT NULL, outcome FROM verve_endpoints ORDER BY endpoint")
    assert sorted((attempted, outcome) for _, attempted, outcome in rows) == [
        (False, None), (False, None), (True, "cancelled")
    ], rows  # fmt: skip


def test_a_stored_endpoint_that_does_not_parse_is_recorded_as_an_error() -> None:
    callbacks = Callbacks("me", "get", parse_allow_list(""), 5.0, 1)
    for endpoint in ("http://[::1/x", "http://[zz]/"):
        result = asyncio.run(callbacks.call(100, endpoint, 1))
        assert result.outcome == "error", endpoint


def test_a_claimer_whose_lease_was_taken_over_still_records_once_and_writes_the_one_line(
    db: Database, tmp_path: Path
) -> None:
    log = tmp_path / "verve.log"
    db.query("UPDATE verve_meta SET value = value - 10 WHERE name = 'first_start'")  # a few windows are due

    class SlowReporter(Reporter):
        def _failpoint(self) -> None:  # between the claim and the count: another process takes the window over
            db.query("UPDATE verve_windows SET claimed_by = 'thief', claims = claims + 1 WHERE unique_ids IS NULL")

    async def run() -> None:
        conn = await _connect(db)
        try:
            reporter = SlowReporter("slow", 2, 0.1, 0.5, False, str(log), 3600.0, 86400.0)
            reported = await reporter.step(conn)
            assert reported, "the slow claimer recorded what nobody else had"
            later = await Reporter("thief", 2, 0.1, 0.5, False, str(log), 3600.0, 86400.0).step(conn)
            assert not set(later) & set(reported)  # (a window that became due meanwhile is the thief's to report)
            return reported
        finally:
            await conn.close()

    reported = asyncio.run(run())
    lines = report_lines(log)
    assert len(lines) == len({start for start, _, _ in lines}) == len(db.query("SELECT 1 FROM verve_windows"))
    by = db.query("SELECT reported_by FROM verve_windows WHERE window_start = ANY(%s)", (reported,))
    assert {row[0] for row in by} == {"slow"}


def test_due_windows_follow_the_database_clock_not_the_local_one(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.query("UPDATE verve_meta SET value = value - 10 WHERE name = 'first_start'")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)  # this instance's clock runs an hour fast

    async def run() -> list[int]:
        conn = await _connect(db)
        try:
            return await Reporter("fast", 2, 0.1, 5.0, False, str(tmp_path / "verve.log"), 3600.0, 86400.0).step(conn)
        finally:
            await conn.close()

    reported = asyncio.run(run())
    db_now = float(db.query("SELECT extract(epoch FROM now())::float8")[0][0])  # type: ignore[arg-type]
    assert reported, "windows due by the database's clock are reported"
    assert max(reported) + 2 <= db_now, "no window still open by the database's clock"
    assert max(int(row[0]) for row in db.query("SELECT window_start FROM verve_windows")) + 2 <= db_now  # type: ignore[call-overload]


def test_a_callback_does_not_read_an_endless_body() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = int(listener.getsockname()[1])

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 65536)
                done.wait(120)  # the rest of the body never comes

        done = threading.Event()
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            callbacks = Callbacks("me", "get", parse_allow_list(""), 60.0, 1)

            async def run() -> Outcome:
                try:
                    return await callbacks.call(100, f"http://127.0.0.1:{port}/big", 1)
                finally:
                    await callbacks.close()

            assert asyncio.run(run()) == Outcome("2xx", 200, None)
        finally:
            done.set()
            thread.join(10)


def test_a_host_name_resolving_outside_the_allow_list_is_refused_by_the_resolver() -> None:
    allow = parse_allow_list("10.0.0.0/8")
    with pytest.raises(TargetRefused, match="not in --verve-callback-allow"):
        asyncio.run(CheckedResolver(allow).resolve("localhost", 80))
    callbacks = Callbacks("me", "get", allow, 30.0, 1)

    async def run() -> Outcome:
        try:
            return await callbacks.call(100, "http://localhost:9/hook", 1)  # a name: the resolver decides
        finally:
            await callbacks.close()

    result = asyncio.run(run())
    assert result.outcome == "refused" and "not in --verve-callback-allow" in str(result.error), result


def test_a_flushed_batch_of_several_parts_and_windows_stores_each_id_once(db: Database) -> None:
    """The write path sends ids as JSON parts of ID_PART_SIZE through COPY: a batch larger than a part, in two
    windows, with ids repeated within and across batches, must store each (window, id) once; two halves written
    under savepoints in one transaction (a refused batch's bisection) each merge only their own parts."""
    from fastcount.features.verve.accept import PendingIds
    from fastcount.features.verve.schema import ID_PART_SIZE

    ids = PendingIds(window_seconds=60, max_pending=10**6, max_endpoints=10, flush_max_keys=10**6)
    many = list(range(-5, ID_PART_SIZE * 2 + 7))  # three parts; negative ids too
    batch = ({60: [*many, 3, 3, -5], 120: [2**63 - 1, -(2**63), 7]}, {})

    async def write() -> None:
        conn = await _connect(db)
        async with conn.transaction():
            await ids.write(conn, batch)
        first, second = ids.split(({180: [1, 2, 3, 4]}, {}))
        async with conn.transaction():
            async with conn.transaction():
                await ids.write(conn, first)
            async with conn.transaction():
                await ids.write(conn, second)
        async with conn.transaction():
            await ids.write(conn, batch)  # a retried batch: nothing new
        await conn.close()

    asyncio.run(write())
    rows = db.query("SELECT window_start, count(*), min(id), max(id) FROM verve_ids GROUP BY 1 ORDER BY 1")
    assert rows == [(60, len(many), -5, ID_PART_SIZE * 2 + 6), (120, 3, -(2**63), 2**63 - 1), (180, 4, 1, 4)]


def test_librdkafka_lines_while_the_broker_is_away_are_one_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """New-user trial: 7-8 ERROR lines a second per worker from librdkafka while the broker was unreachable (1,149 in
    2.5 minutes), drowning the throttled event=verve_kafka_error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    producer = KafkaOutbox("test", f"127.0.0.1:{closed}", "t", 5.0)._producer()
    for throttle in logging.getLogger("fastcount.verve.kafka").filters:  # the process's: other tests' lines count
        if isinstance(throttle, OnePerInterval):
            throttle.last.clear()
    with caplog.at_level(logging.DEBUG, logger="fastcount.verve.kafka"):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            producer.poll(0.1)  # librdkafka hands its log lines over here, as in the outbox's step
    lines = [record for record in caplog.records if record.name == "fastcount.verve.kafka"]
    assert len(lines) == 1, [record.getMessage() for record in lines]
    assert "Connection refused" in lines[0].getMessage()


def test_the_librdkafka_throttle_keeps_other_kinds_of_lines_and_says_what_it_left_out() -> None:
    throttle = OnePerInterval()

    def passes(level: int, message: str) -> str | None:
        record = logging.LogRecord(
            "fastcount.verve.kafka", level, __file__, 1, "%s %s", tuple(message.split(" ", 1)), None
        )
        return record.getMessage() if throttle.filter(record) else None

    assert passes(logging.ERROR, "FAIL client refused") == "FAIL client refused"
    assert passes(logging.ERROR, "FAIL client refused") is None
    assert passes(logging.ERROR, "SASL client authentication failed") == "SASL client authentication failed"
    assert passes(logging.WARNING, "FAIL client refused") == "FAIL client refused", "another level is another kind"
    throttle.last[(logging.ERROR, "FAIL")] -= 31  # the interval has passed
    shown = passes(logging.ERROR, "FAIL client refused")
    assert shown is not None and shown.startswith("FAIL client refused (1 more like it in the 31 s before, left out)")


def test_a_database_keeps_its_kafka_topic_and_every_report_is_published_once_one_instance_used_kafka(
    db: Database, tmp_path: Path
) -> None:
    """New-user trial: an instance without --kafka-bootstrap beside Kafka ones recorded its reports as not to be
    published (none reached Kafka), and one with another --kafka-topic published the windows it claimed there."""

    def settings(**values: str) -> Settings:
        return Settings.from_sources({"dsn": db.dsn, **values}, environ={}, sections=settings_sections())

    async def scenario() -> list[str | None]:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            problems = [
                await VerveFeature.check_database(conn, settings()),  # no Kafka: nothing kept
                await VerveFeature.check_database(conn, settings(kafka_bootstrap="k:9092", kafka_topic="reports")),
                await VerveFeature.check_database(conn, settings(kafka_bootstrap="k:9092", kafka_topic="reports")),
                await VerveFeature.check_database(conn, settings(kafka_bootstrap="k:9092", kafka_topic="other")),
                await VerveFeature.check_database(conn, settings()),  # may share it: its reports are published
            ]
            await conn.execute("UPDATE verve_meta SET value = value - 20 WHERE name = 'first_start'")  # windows due
            reporter = Reporter("no-kafka", 2, 0.1, 5.0, False, str(tmp_path / "verve.log"), 3600.0, 86400.0)
            await reporter.step(conn)
            await asyncio.sleep(0.3)
            await reporter.step(conn)
            # every instance exports the backlog (helper-22: only the outbox did, so with no Kafka instance left
            # nothing showed it)
            assert reporter.kafka_lag_seconds > 0
        return problems

    problems = asyncio.run(scenario())
    assert problems[:3] == [None, None, None] and problems[4] is None
    assert problems[3] is not None and problems[3].startswith("--kafka-topic other differs from the topic")
    pending = db.query("SELECT DISTINCT kafka_pending FROM verve_windows WHERE unique_ids IS NOT NULL")
    assert pending == [(True,)], "reported by an instance without Kafka, published by the others"
