"""GET /healthz (the worker runs) and GET /readyz (PostgreSQL answers and no feature reports a problem)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from fastcount.server.responses import Response, json_response
from fastcount.server.routing import Route

HEALTHY = json_response(200, {"status": "ok"}, cacheable=True)
PING_TIMEOUT = 2.0


class Health:
    def __init__(self, read_pool: AsyncConnectionPool[Any], problems: Callable[[], list[str]]) -> None:
        self.read_pool = read_pool
        self.problems = problems

    def routes(self) -> list[Route]:
        return [  # both answer HEAD too: load balancers may check with it
            Route(b"GET", b"/healthz", self.handle_health, name="healthz", head=True),
            Route(b"GET", b"/readyz", self.handle_ready, name="readyz", head=True),
        ]

    def handle_health(self, path: bytes, query: bytes, body: bytes) -> Response:
        return HEALTHY

    async def handle_ready(self, path: bytes, query: bytes, body: bytes) -> Response:
        problems = self.problems()
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                async with self.read_pool.connection() as conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError):
            problems.append("postgres unreachable")
        if problems:
            return json_response(503, {"status": "not ready", "problems": problems}, ((b"Retry-After", b"1"),))
        return json_response(200, {"status": "ready"})
