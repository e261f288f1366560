"""Per-worker counters kept as plain ints on the hot path.

Nothing here talks to Prometheus: the request path only adds to attributes and dict entries, and a publisher reads
them on the worker's tick. This module owns the numbers, not their exposition.
"""

from __future__ import annotations


class WorkerStats:
    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "connections_closed",
        "connections_opened",
        "flush_errors",
        "flush_retries",
        "flush_seconds",
        "flushed_rows",
        "flushes",
        "rejected_overload",
        "requests",
        "responses_by_status",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.responses_by_status: dict[int, int] = {}
        self.connections_opened = 0
        self.connections_closed = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.flushes = 0
        self.flush_errors = 0
        self.flush_retries = 0
        self.flushed_rows = 0
        self.flush_seconds = 0.0
        self.rejected_overload = 0
