"""The Kafka outbox: a report is recorded in PostgreSQL as unpublished (verve_windows.kafka_pending) and stays so
until the broker acknowledges its message. A publisher claims unpublished reports with a lease (`FOR UPDATE SKIP
LOCKED`), keeps renewing it while their messages are in its producer, and marks them published on delivery; a
failed delivery releases the claim for a later attempt. A broker outage delays reports; a restart resumes them.

confluent-kafka's producer is threaded C code: `produce` only queues, and delivery callbacks run inside `poll(0)`,
called on each step of the event loop's job (never blocking); only the final `flush` runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import psycopg

from fastcount.features.verve.reporter import iso
from fastcount.features.verve.schema import (
    CLAIM_UNPUBLISHED,
    MARK_PUBLISHED,
    RELEASE_UNPUBLISHED,
    RENEW_PUBLISH_LEASE,
)

log = logging.getLogger(__name__)

CLAIM_LIMIT = 100
ERROR_LOG_EVERY = 30.0


def report_message(window_start: int, window_seconds: int, unique_ids: int) -> tuple[bytes, bytes]:
    """(key, value) of a window's message: key the window start (ISO-8601 UTC), value JSON."""
    start = iso(window_start)
    value = {
        "window_start": start,
        "window_start_unix": window_start,
        "window_seconds": window_seconds,
        "unique_ids": unique_ids,
    }
    return start.encode(), orjson.dumps(value)


class KafkaOutbox:
    def __init__(self, me: str, bootstrap: str, topic: str, lease: float) -> None:
        self.me = me
        self.bootstrap = bootstrap
        self.topic = topic
        self.lease = lease
        self.producer: Any = None
        self.held: set[int] = set()  # windows whose messages are in the producer, awaiting the broker
        self.delivered: list[int] = []  # acknowledged by the broker, not yet marked in PostgreSQL
        self.undelivered: list[int] = []  # failed for good in the producer: release the claim
        self.last_error_log = -ERROR_LOG_EVERY
        # metrics
        self.published = 0
        self.failures = 0

    def _producer(self) -> Any:
        if self.producer is None:
            from confluent_kafka import Producer  # imported here: a worker without Kafka never loads librdkafka

            self.producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "message.timeout.ms": 300_000,
                    "client.id": f"fastcount-{self.me}"[:200],
                    "error_cb": self._on_error,
                    "logger": librdkafka_logger(),
                }
            )
        return self.producer

    def _on_error(self, error: Any) -> None:
        now = time.monotonic()
        if now - self.last_error_log >= ERROR_LOG_EVERY:  # the broker being away is reported every few seconds
            self.last_error_log = now
            log.warning("event=verve_kafka_error error=%r", str(error))

    def _on_delivery(self, error: Any, message: Any) -> None:
        window = _window_of(message)
        if error is None:
            self.delivered.append(window)
        else:
            self.failures += 1
            self.undelivered.append(window)
            log.warning("event=verve_kafka_delivery_failed window_start=%s error=%r", iso(window), str(error))

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        producer = self._producer()
        producer.poll(0)
        await self.record_deliveries(conn)
        if self.held:
            await conn.execute(RENEW_PUBLISH_LEASE, {"lease": self.lease, "held": sorted(self.held), "me": self.me})
        if len(self.held) < CLAIM_LIMIT:
            rows = await (
                await conn.execute(
                    CLAIM_UNPUBLISHED,
                    {"me": self.me, "lease": self.lease, "held": sorted(self.held), "limit": CLAIM_LIMIT},
                )
            ).fetchall()
            for window, seconds, count in rows:
                key, value = report_message(int(window), int(seconds), int(count))
                try:
                    producer.produce(self.topic, key=key, value=value, on_delivery=self._on_delivery)
                except BufferError:
                    break  # the producer's queue is full; the claim expires and is taken again
                self.held.add(int(window))
            producer.poll(0)

    async def record_deliveries(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """What the broker acknowledged becomes published; what failed is released for another attempt."""
        if self.delivered:
            windows = list(self.delivered)
            await conn.execute(MARK_PUBLISHED, (windows,))
            del self.delivered[: len(windows)]
            self.held.difference_update(windows)
            self.published += len(windows)
            for window in windows:
                log.info("event=verve_kafka_published window_start=%s", iso(window))
        if self.undelivered:
            windows = list(self.undelivered)
            await conn.execute(RELEASE_UNPUBLISHED, {"windows": windows, "me": self.me})
            del self.undelivered[: len(windows)]
            self.held.difference_update(windows)

    async def close(self) -> None:
        """Give queued messages a few seconds to be delivered (in a thread: flush blocks)."""
        if self.producer is not None and self.held:
            await asyncio.to_thread(self.producer.flush, 5.0)  # runs the delivery callbacks


def _window_of(message: Any) -> int:
    return int(orjson.loads(message.value())["window_start_unix"])


class OnePerInterval(logging.Filter):
    """librdkafka logs every failed connection attempt: 7-8 ERROR lines a second per worker while the broker is away
    (new-user trial: 1,149 lines in 2.5 minutes). Of the lines of one level and librdkafka facility (FAIL, ERROR, ...:
    the first word), one per ERROR_LOG_EVERY seconds passes, saying how many it stands for; another kind of line (an
    authentication failure beside the refused connections) is not hidden by them."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[tuple[int, str], float] = {}
        self.left_out: dict[tuple[int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = (record.levelno, message.split(" ", 1)[0])
        now = time.monotonic()
        last = self.last.get(kind)
        if last is not None and now - last < ERROR_LOG_EVERY:
            self.left_out[kind] = self.left_out.get(kind, 0) + 1
            return False
        left_out = self.left_out.pop(kind, 0)
        if left_out and last is not None:
            record.msg = f"{message} ({left_out} more like it in the {now - last:.0f} s before, left out)"
            record.args = None
        self.last[kind] = now
        return True


def librdkafka_logger() -> logging.Logger:
    logger = logging.getLogger("fastcount.verve.kafka")
    if not any(isinstance(existing, OnePerInterval) for existing in logger.filters):
        logger.addFilter(OnePerInterval())
    return logger
