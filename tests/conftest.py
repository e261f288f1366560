"""Shared fixtures: one real PostgreSQL for the session and real fastcount servers started as subprocesses.

PostgreSQL is the embedded one (the same code `fastcount serve` uses), or FASTCOUNT_TEST_DSN when set. Servers run
`python -m fastcount serve` on an ephemeral port and are stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from fastcount.app import schema
from fastcount.store.database import migrate_dsn
from fastcount.store.embedded import EmbeddedPostgres, temporary_postgres

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Database:
    dsn: str
    embedded: EmbeddedPostgres | None = None

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(sql, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def total(self, prefix: str) -> int:
        rows = self.query("SELECT coalesce(sum(value), 0) FROM counters WHERE key LIKE %s", (prefix + "%",))
        return int(rows[0][0])  # type: ignore[call-overload]

    def counts(self, prefix: str) -> dict[str, int]:
        rows = self.query("SELECT key, value FROM counters WHERE key LIKE %s", (prefix + "%",))
        return {str(key): int(value) for key, value in rows}  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    dsn = os.environ.get("FASTCOUNT_TEST_DSN")
    with contextlib.ExitStack() as stack:
        if dsn:
            db = Database(dsn)
        else:
            embedded = stack.enter_context(temporary_postgres("fastcount-test-"))
            db = Database(embedded.dsn, embedded)
        asyncio.run(migrate_dsn(db.dsn, schema()))
        yield db


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workers: int
    args: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log)) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} x{count} in server log after {timeout}s:\n{self.log}")

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(database: Database, tmp_path: Path) -> Iterator[StartServer]:
    started: list[Server] = []

    def start(*args: str, workers: int = 1, env: dict[str, str] | None = None, dsn: str | None = None) -> Server:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        command = [
            sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--dsn", dsn or database.dsn, "--flush-interval", "0.2", "--admin-port", "0",
            *args,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ, **(env or {})}
            )
        server = Server(port, process, log_path, workers, list(args))
        started.append(server)
        server.wait_for_log(r"event=serving")
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests can share one database."""
    return f"t{uuid.uuid4().hex[:10]}-"
