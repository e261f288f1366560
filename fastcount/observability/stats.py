"""Per-worker counters kept as plain ints on the hot path, and the snapshot a worker sends its master each second.

Nothing here talks to Prometheus: the request path only adds to attributes, and the worker's tick turns them into a
small JSON snapshot that travels over the status pipe (metrics.py in the master turns snapshots into exposition).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from typing import Any

import orjson

# Seconds a sampled read took to handle (parse, route, answer). Sub-millisecond is the normal case.
REQUEST_SECONDS_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0)
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
FLUSH_KEYS_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# accept() errors that mean a resource ran out; always published (as 0 until they happen), so alerts can rate() them.
ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": self.bounds, "counts": self.counts, "sum": self.total}


class WorkerStats:
    __slots__ = (
        "accept_errors",
        "accept_pauses",
        "background_job_failures",
        "bytes_received",
        "bytes_sent",
        "connections_closed",
        "connections_opened",
        "dead_letters",
        "flush_errors",
        "flush_keys",
        "flush_retries",
        "flush_seconds",
        "flushed_rows",
        "flushes",
        "request_seconds",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.connections_opened = 0
        self.connections_closed = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.flushes = 0
        self.flush_errors = 0
        self.flush_retries = 0
        self.flushed_rows = 0
        self.dead_letters = 0
        self.background_job_failures = 0
        self.accept_pauses = 0  # times the worker reached --max-connections and stopped accepting
        self.accept_errors: dict[str, int] = dict.fromkeys(ACCEPT_ERRORS, 0)  # errno name -> failed accept() calls
        self.request_seconds = Histogram(REQUEST_SECONDS_BUCKETS)
        self.flush_seconds = Histogram(FLUSH_SECONDS_BUCKETS)
        self.flush_keys = Histogram(FLUSH_KEYS_BUCKETS)

    def snapshot(
        self,
        answers: dict[str, dict[int, int]],
        gauges: dict[str, float],
        counters: dict[str, float] | None = None,
        help_texts: dict[str, str] | None = None,
    ) -> bytes:
        """One status-pipe message: `S` + JSON + newline. Counters are cumulative for this process. Series the
        master does not know by name (the features') carry their help text along."""
        document = {
            "counters": {
                "requests": self.requests,
                "connections_opened": self.connections_opened,
                "connections_closed": self.connections_closed,
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
                "flushes": self.flushes,
                "flush_errors": self.flush_errors,
                "flush_retries": self.flush_retries,
                "flushed_rows": self.flushed_rows,
                "dead_letters": self.dead_letters,
                "background_job_failures": self.background_job_failures,
                "accept_pauses": self.accept_pauses,
                **{f'http_accept_errors{{errno="{name}"}}': count for name, count in self.accept_errors.items()},
                "cpu_seconds": time.process_time(),
                **(counters or {}),
            },
            "help": help_texts or {},
            "answers": {
                route: {str(status): count for status, count in by_status.items()}
                for route, by_status in answers.items()
            },
            "gauges": {**gauges, **process_gauges()},
            "histograms": {
                "request_seconds": self.request_seconds.snapshot(),
                "flush_seconds": self.flush_seconds.snapshot(),
                "flush_keys": self.flush_keys.snapshot(),
            },
        }
        return b"S" + orjson.dumps(document) + b"\n"


def process_gauges() -> dict[str, float]:
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return {}
    return {"resident_memory_bytes": resident_pages * PAGE_SIZE, "open_fds": open_fds}
