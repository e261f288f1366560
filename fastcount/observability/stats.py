"""Per-worker counters kept as plain ints on the hot path, and the snapshot a worker sends its master each second.

Nothing here talks to Prometheus: the request path only adds to attributes, and the worker's tick turns them into a
small JSON snapshot that travels over the status pipe (metrics.py in the master turns snapshots into exposition).
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from time import perf_counter, thread_time
from typing import Any

import orjson

# Seconds a sampled read took to handle (parse, route, answer). Sub-millisecond is the normal case.
REQUEST_SECONDS_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0)
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
FLUSH_KEYS_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000)
# Seconds the event loop ran late for the loop-lag probe's 1 ms timer: how long other work held the loop.
LOOP_LAG_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LOOP_LAG_PERIOD = 0.001
# While a worker answers no request the probe wakes it 20 times a second, not 1,000: the 1 ms timer alone kept an idle
# worker at ~3.5% of a core (0.5% with 50 ms; measured). The worker's tick sets the pace each second (`pace`).
LOOP_LAG_IDLE_PERIOD = 0.05
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# accept() errors that mean a resource ran out; always published (as 0 until they happen), so alerts can rate() them.
ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
# Listing /proc/self/fd costs ~1-2 us per descriptor, all of it holding the event loop (1,000 fds: 1.4 ms, 10,000:
# 11 ms, bench/loop_stalls.py). So the open-fd gauge is the connections the protocol counts plus the other descriptors
# of the last listing, and the listing is redone only every FD_LIST_EVERY seconds, and only while it is cheap.
FD_LIST_EVERY = 60.0
FD_LIST_MAX_CONNECTIONS = 256


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


class LoopLagProbe:
    """Every LOOP_LAG_PERIOD the loop should run our callback; how late it runs is how long something else held the
    loop (a stall). The timer's own rounding (uvloop keeps milliseconds) is the floor of what it can see.

    On a shared machine a late timer may also mean this process was not on a CPU at all (preempted). So besides the
    wall-clock lag (the histogram: what clients see), it keeps the longest lag the thread spent on the CPU (`own`:
    CPU time used since the last run beyond one period): fastcount's own work, the figure the benchmark holds to 1 ms.
    """

    __slots__ = ("armed", "expected", "handle", "histogram", "last_cpu", "loop", "max_lag", "max_own_lag", "period")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.max_lag = 0.0  # since the last snapshot
        self.max_own_lag = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.expected = 0.0
        self.last_cpu = 0.0
        self.period = LOOP_LAG_PERIOD
        self.armed = LOOP_LAG_PERIOD  # the period the pending timer was set with (`pace` may change `period` first)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.armed = self.period
        self.expected = perf_counter() + self.armed
        self.last_cpu = thread_time()
        self.handle = loop.call_later(self.armed, self._fire)

    def pace(self, busy: bool) -> None:
        """Every 1 ms while the worker answers requests (their wait is what the probe is for), every 50 ms while
        it answered none in the last second. Traffic that starts is sampled at 50 ms until the next tick."""
        self.period = LOOP_LAG_PERIOD if busy else LOOP_LAG_IDLE_PERIOD

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        now = perf_counter()
        cpu = thread_time()
        lag = now - self.expected
        if lag < 0.0:
            lag = 0.0
        self.histogram.observe(lag)
        if lag > self.max_lag:
            self.max_lag = lag
        own = min(lag, cpu - self.last_cpu - self.armed)  # the CPU used beyond the wait this timer was set for
        if own > self.max_own_lag:
            self.max_own_lag = own
        self.last_cpu = cpu
        period = self.armed = self.period
        self.expected = now + period
        self.handle = self.loop.call_later(period, self._fire)  # type: ignore[union-attr]

    def take_max(self) -> tuple[float, float]:
        """The longest lag and the longest own (on-CPU) lag since the last call: the per-second gauges."""
        longest, own = self.max_lag, self.max_own_lag
        self.max_lag = self.max_own_lag = 0.0
        return longest, own


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
        "fd_baseline",
        "fd_listed_at",
        "flush_seconds",
        "flushed_rows",
        "flushes",
        "loop_lag",
        "loop_lag_seconds",
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
        self.flush_seconds: dict[str, Histogram] = {}  # by buffer
        self.flush_keys = Histogram(FLUSH_KEYS_BUCKETS)
        self.fd_baseline = -1  # descriptors other than client connections, at the last listing
        self.fd_listed_at = -FD_LIST_EVERY
        self.loop_lag_seconds = Histogram(LOOP_LAG_BUCKETS)
        self.loop_lag = LoopLagProbe(self.loop_lag_seconds)

    def flush_seconds_of(self, buffer: str) -> Histogram:
        histogram = self.flush_seconds.get(buffer)
        if histogram is None:
            histogram = self.flush_seconds[buffer] = Histogram(FLUSH_SECONDS_BUCKETS)
        return histogram

    def snapshot(
        self,
        answers: dict[str, dict[int, int]],
        gauges: dict[str, float],
        counters: dict[str, float] | None = None,
        help_texts: dict[str, str] | None = None,
    ) -> bytes:
        """One status-pipe message: `S` + JSON + newline. Counters are cumulative for this process. Series the
        master does not know by name (the features') carry their help text along."""
        lag_max, own_lag_max = self.loop_lag.take_max()
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
            "gauges": {
                **gauges,
                **self.process_gauges(int(gauges.get("connections_open", 0))),
                "loop_lag_max_seconds": lag_max,
                "loop_lag_own_max_seconds": own_lag_max,
            },
            "histograms": {
                "request_seconds": self.request_seconds.snapshot(),
                **{
                    f'flush_seconds{{buffer="{buffer}"}}': histogram.snapshot()
                    for buffer, histogram in self.flush_seconds.items()
                },
                "flush_keys": self.flush_keys.snapshot(),
                "loop_lag_seconds": self.loop_lag_seconds.snapshot(),
            },
        }
        return b"S" + orjson.dumps(document) + b"\n"

    def process_gauges(self, connections: int) -> dict[str, float]:
        try:
            with open("/proc/self/statm") as statm:
                resident_pages = int(statm.read().split()[1])
            now = time.monotonic()
            if self.fd_baseline < 0 or (
                now - self.fd_listed_at >= FD_LIST_EVERY and connections < FD_LIST_MAX_CONNECTIONS
            ):
                self.fd_baseline = len(os.listdir("/proc/self/fd")) - connections
                self.fd_listed_at = now
        except OSError:
            return {}
        return {"resident_memory_bytes": resident_pages * PAGE_SIZE, "open_fds": connections + self.fd_baseline}
