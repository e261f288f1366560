"""More clients than file descriptors (issue #11): a worker under a small RLIMIT_NOFILE stops accepting at its cap,
keeps flushing (its PostgreSQL connections can always reconnect), answers everything it accepted, and serves the
connections that waited in the backlog once others close. Real server, real PostgreSQL, real sockets."""

from __future__ import annotations

import re
import resource
import selectors
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Database, Server, free_port

SOFT, HARD = 100, 200  # the master raises the soft limit to the hard one before it forks
RESERVE = 64  # fastcount.server.worker.FD_RESERVE
ANSWER_202 = b"HTTP/1.1 202 "

StartLimited = Callable[..., tuple[Server, int]]


@pytest.fixture
def start_limited(database: Database, tmp_path: Path) -> Iterator[StartLimited]:
    """A one-worker server whose RLIMIT_NOFILE starts at SOFT:HARD, with its admin port; stopped at the end."""
    started: list[Server] = []

    def start(*args: str) -> tuple[Server, int]:
        port, admin_port = free_port(), free_port()
        log_path = tmp_path / f"server-{port}.log"
        command = [
            sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--dsn", database.dsn, "--flush-interval", "0.2", "--admin-port", str(admin_port),
            "--keepalive-timeout", "120", *args,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD)),
            )
        server = Server(port, process, log_path, 1, list(args))
        started.append(server)
        server.wait_for_log(r"event=serving")
        return server, admin_port

    yield start
    for server in started:
        server.stop()


def metrics(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def series(text: str, name: str, **labels: str) -> float:
    """The value of one series of the exposition (labels in any order); absent: AssertionError."""
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{label}="{value}"' in match.group(1) for label, value in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def published(admin_port: int) -> str:
    """The metrics once the worker has sent its first snapshot (it does so on its one-second tick)."""
    wait_until(lambda: "fastcount_http_max_connections{" in metrics(admin_port), "a worker snapshot")
    return metrics(admin_port)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def increment(key: str) -> bytes:
    body = b'{"key": "%s", "value": 1}' % key.encode()
    return b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Clients:
    """Many keep-alive connections, each with at most one request outstanding, read through one selector."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.received: dict[int, bytes] = {}
        self.answers: dict[int, list[bytes]] = {}  # client index -> status lines of complete answers
        self.sent: dict[int, int] = {}  # client index -> requests sent
        for index in range(count):
            # A connection the worker has not accepted is still established: the kernel completed the handshake
            # and keeps it in the listening socket's backlog.
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.received[index] = b""
            self.answers[index] = []
            self.sent[index] = 0
            self.selector.register(sock, selectors.EVENT_READ, index)

    def send_all(self, request: bytes, which: list[int]) -> None:
        for index in which:
            self.sent[index] += 1
            self.sockets[index].setblocking(True)
            self.sockets[index].sendall(request)
            self.sockets[index].setblocking(False)

    def pump(self, close_answered: bool = False) -> None:
        """Read what has arrived; a reset or an end of file fails the test (waiting clients must not be dropped)."""
        for key, _ in self.selector.select(timeout=0.05):
            index: int = key.data
            sock = self.sockets[index]
            data = sock.recv(65536)  # a reset raises ConnectionResetError here, and fails the test
            assert data, f"client {index} closed by the server: {self.sent[index]} sent, answers {self.answers[index]}"
            buffer = self.received[index] + data
            while b"\r\n\r\n" in buffer:  # the answers to increments have an empty body
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                assert b"Content-Length: 0" in head, head
                self.answers[index].append(head.split(b"\r\n", 1)[0])
            self.received[index] = buffer
            if close_answered and self.answers[index]:
                self.selector.unregister(sock)
                sock.close()

    def release_answered(self) -> None:
        """Close every client whose requests are all answered."""
        for index in self.answered():
            if self.sockets[index].fileno() >= 0 and len(self.answers[index]) == self.sent[index]:
                self.selector.unregister(self.sockets[index])
                self.sockets[index].close()

    def answered(self, requests: int = 1) -> list[int]:
        return [index for index, answers in self.answers.items() if len(answers) >= requests]

    def close(self) -> None:
        self.selector.close()
        for sock in self.sockets:
            sock.close()


def test_worker_at_its_connection_cap_keeps_flushing_and_serves_waiting_clients_later(
    start_limited: StartLimited, database: Database, prefix: str
) -> None:
    server, admin_port = start_limited()
    cap = HARD - RESERVE
    server.wait_for_log(rf"event=fd_limit_raised from={SOFT} to={HARD}")
    server.wait_for_log(rf"event=worker_serving slot=0 fd_limit={HARD} max_connections={cap}\b")
    clients = Clients(server.port, 400)
    try:
        clients.send_all(increment(prefix + "held"), list(range(400)))
        wait_until(lambda: (clients.pump(), len(clients.answered()) >= cap)[1], f"{cap} clients answered")
        clients.pump()
        answered = clients.answered()
        assert len(answered) == cap  # the cap, exactly: the rest wait in the backlog, unanswered but not reset
        assert all(clients.answers[index] == [b"HTTP/1.1 202 Accepted"] for index in answered)
        wait_until(lambda: database.total(prefix) == cap, "the accepted requests flushed while at the cap")

        text = published(admin_port)
        assert series(text, "fastcount_http_max_connections", worker="0") == cap
        assert series(text, "fastcount_worker_fd_limit", worker="0") == HARD
        wait_until(
            lambda: series(published(admin_port), "fastcount_http_accept_pauses_total", worker="0") >= 1,
            "the pause at the cap published",
        )
        assert series(text, "fastcount_http_accept_errors_total", worker="0", errno="EMFILE") == 0
        wait_until(lambda: series(metrics(admin_port), "fastcount_http_accept_paused", worker="0") == 1, "paused gauge")
        server.wait_for_log(rf"event=max_connections_reached slot=0 connections={cap} max_connections={cap}")

        # At the cap, the flusher must still be able to open connections: drop them all under it, then count more.
        database.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND datname = current_database() AND backend_type = 'client backend'"
        )
        clients.send_all(increment(prefix + "held"), answered)
        wait_until(lambda: (clients.pump(), len(clients.answered(2)) == cap)[1], "second requests answered")
        wait_until(lambda: database.total(prefix) == 2 * cap, "flushed over new connections while at the cap")

        # The clients go: each closes once answered, and every waiting one is accepted and answered in turn.
        clients.release_answered()
        wait_until(lambda: (clients.pump(close_answered=True), len(clients.answered()) == 400)[1], "all answered")
        assert all(answers[0] == b"HTTP/1.1 202 Accepted" for answers in clients.answers.values())
        wait_until(lambda: database.total(prefix) == 400 + cap, "every answered request flushed")
        wait_until(
            lambda: series(metrics(admin_port), "fastcount_http_accept_paused", worker="0") == 0, "accepting again"
        )
    finally:
        clients.close()
    assert "event=accept_failed" not in server.log  # the cap kept accept() clear of EMFILE
    assert server.stop() == 0


def test_accept_errors_past_the_descriptor_limit_are_counted_and_queued_clients_not_reset(
    start_limited: StartLimited, database: Database, prefix: str
) -> None:
    server, admin_port = start_limited("--max-connections", "1000")  # above what 200 descriptors allow
    server.wait_for_log(r"event=max_connections_above_fd_limit slot=0 max_connections=1000 fd_limit=200")
    clients = Clients(server.port, 300)
    try:
        clients.send_all(increment(prefix + "over"), list(range(300)))
        wait_until(
            lambda: series(published(admin_port), "fastcount_http_accept_errors_total", worker="0", errno="EMFILE") > 0,
            "EMFILE counted",
        )
        server.wait_for_log(r"event=accept_failed slot=0 errno=EMFILE .*LimitNOFILE")
        # Whatever the worker could not accept stays queued: released clients make room, and all are answered.
        clients.pump()
        clients.release_answered()
        wait_until(lambda: (clients.pump(close_answered=True), len(clients.answered()) == 300)[1], "all answered")
        assert all(answers[0] == b"HTTP/1.1 202 Accepted" for answers in clients.answers.values())
        wait_until(lambda: database.total(prefix) == 300, "every answered request flushed")
    finally:
        clients.close()
    assert len(re.findall(r"event=accept_failed", server.log)) < 300  # logged per interval, not per error
    assert server.stop() == 0
