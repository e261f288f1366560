"""Shared fixtures: one real PostgreSQL for the session and real fastcount servers started as subprocesses.

PostgreSQL is the embedded one (the same code `fastcount serve` uses), or FASTCOUNT_TEST_DSN when set. Servers run
`python -m fastcount serve` on an ephemeral port and are stopped (SIGTERM, then SIGKILL) when the test ends. At that
point the server's log must hold no Traceback and no error event (`level=ERROR`) the test did not declare with
`expect_errors=(regex, ...)`, and its exit code must be `expect_exit` (0 unless declared): a bug that only shows in
the log fails the test that provoked it.
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
import threading
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
    expect_errors: tuple[str, ...] = ()  # regexes of error lines this test provokes on purpose
    expect_exit: int | None = 0  # the master's exit code at teardown; None: the test checks it itself

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

    def unexpected_errors(self) -> list[str]:
        """Lines of the log that say something went wrong and that the test did not declare."""
        found = []
        for line in self.log.splitlines():
            alarming = "Traceback" in line or re.search(r"level=(ERROR|CRITICAL)", line)
            if alarming and not any(re.search(pattern, line) for pattern in self.expect_errors):
                found.append(line)
        return found

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def worker_with_clients(self) -> int:
        """A worker holding at least one client connection (a kill test must kill a worker that answered something:
        with few keep-alive clients, SO_REUSEPORT may give all of them to one worker)."""
        established = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == self.port and fields[3] == "01":  # ESTABLISHED
                    established.add(f"socket:[{fields[9]}]")
        for pid in self.worker_pids():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) in established:
                        return pid
                except OSError:  # closed since listed
                    continue
        raise AssertionError("no worker holds a client connection")

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
def start_server(database: Database, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StartServer]:
    if "proxied_database" in request.fixturenames:
        request.getfixturevalue("proxied_database")  # set up first, so the proxy outlives the servers' last flush
    started: list[Server] = []

    def start(
        *args: str,
        workers: int = 1,
        env: dict[str, str] | None = None,
        dsn: str | None = None,
        expect_errors: tuple[str, ...] = (),
        expect_exit: int | None = 0,
    ) -> Server:
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
        server = Server(port, process, log_path, workers, list(args), expect_errors, expect_exit)
        started.append(server)
        server.wait_for_log(r"event=serving")
        return server

    yield start
    problems = []
    for server in started:
        code = server.stop()
        if server.expect_exit is not None and code != server.expect_exit:
            problems.append(f"server on port {server.port} exited with {code}, expected {server.expect_exit}")
        problems += [f"server on port {server.port} logged: {line}" for line in server.unexpected_errors()]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests can share one database."""
    return f"t{uuid.uuid4().hex[:10]}-"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll a condition until it holds; the deadline is generous and only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


class Proxy:
    """A TCP proxy (to PostgreSQL, say) that a test can cut (close every connection, refuse new ones) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@dataclass
class ProxiedDatabase:
    """The shared database behind a proxy the test can cut: `dsn` goes through it."""

    dsn: str
    proxy: Proxy


@pytest.fixture
def proxied_database(database: Database) -> Iterator[ProxiedDatabase]:
    info = psycopg.conninfo.conninfo_to_dict(database.dsn)
    proxy = Proxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))  # type: ignore[call-overload]
    try:
        dsn = psycopg.conninfo.make_conninfo(database.dsn, host="127.0.0.1", port=str(proxy.port))
        yield ProxiedDatabase(dsn, proxy)
    finally:
        proxy.close()
