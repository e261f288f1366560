"""The workloads fastcount serves. `build_features` is the one place a feature is registered with a worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from fastcount.features.health import HealthFeature
from fastcount.features.increment import IncrementFeature, PendingCounts
from fastcount.server.routing import Route
from fastcount.settings import Settings
from fastcount.store.flusher import FlushBuffer, Flusher


@dataclass
class Features:
    routes: list[Route]
    buffers: list[FlushBuffer]
    gauges: Callable[[], dict[str, float]]  # read on the worker's tick, published as per-worker metrics
    journaled: PendingCounts  # the buffer whose accepted requests go to the crash journal


def build_features(settings: Settings, flusher: Flusher, read_pool: AsyncConnectionPool[Any]) -> Features:
    pending_counts = PendingCounts(settings.max_pending_keys, settings.flush_max_keys, flusher.request_flush)
    increment = IncrementFeature(pending_counts, read_pool)
    health = HealthFeature(read_pool, lambda: pending_counts.backlog_keys() >= settings.max_pending_keys)
    return Features(
        routes=[*increment.routes(), *health.routes()],
        buffers=[pending_counts],
        journaled=pending_counts,
        gauges=lambda: {
            "pending_keys": len(pending_counts.pending),
            "retrying_keys": pending_counts.unacknowledged_keys if flusher.failing_since is not None else 0,
            "postgres_connected": int(flusher.connected),
            "journal_used_bytes": pending_counts.journal.used_bytes() if pending_counts.journal else 0,
        },
    )
