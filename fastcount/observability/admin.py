"""The admin listener the master serves from its own loop: GET /metrics (Prometheus text format) and GET /healthz.

The master has no event loop and must start no thread, and nothing here may ever make it wait: every socket is
non-blocking and joins the master's poll(). A client's request head is read as it arrives, the answer is written as
the client takes it, and a client that does not finish within its deadline is closed. It is meant for 127.0.0.1 and
a scraper, not for the public.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

READ_DEADLINE = 2.0  # seconds from accept to a complete request head
WRITE_DEADLINE = 5.0  # seconds to take the whole answer (a metrics page can be ~100 KB)
MAX_CLIENTS = 16  # beyond this, new connections wait in the listen backlog
MAX_REQUEST = 8192
HEAD = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"


class AdminClient:
    __slots__ = ("sock", "deadline", "request", "response")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = b""
        self.response: memoryview | None = None  # what is left to send, once the head has been read


class AdminServer:
    def __init__(self, host: str, port: int, metrics: Callable[[], bytes]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.metrics = metrics
        self.clients: dict[int, AdminClient] = {}

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self.sock.close()

    # -- what the master's poll() watches ---------------------------------------------------------------------------

    def readers(self) -> list[int]:
        watched = [fd for fd, client in self.clients.items() if client.response is None]
        if len(self.clients) < MAX_CLIENTS:
            watched.append(self.sock.fileno())
        return watched

    def writers(self) -> list[int]:
        return [fd for fd, client in self.clients.items() if client.response is not None]

    def next_deadline(self) -> float | None:
        return min((client.deadline for client in self.clients.values()), default=None)

    # -- one turn of the master's loop ------------------------------------------------------------------------------

    def serve(self, readable: set[int], writable: set[int]) -> None:
        if self.sock.fileno() in readable:
            self._accept()
        for fd, client in list(self.clients.items()):
            if client.response is None and fd in readable:
                self._read(client)
            elif client.response is not None and fd in writable:
                self._write(client)
        now = time.monotonic()
        for client in list(self.clients.values()):
            if now >= client.deadline:
                log.info("event=admin_client_timeout phase=%s", "read" if client.response is None else "write")
                self._drop(client)

    def _accept(self) -> None:
        while len(self.clients) < MAX_CLIENTS:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # ECONNABORTED, EMFILE...: try again on the next turn
                log.warning("event=admin_accept_failed error=%r", str(error))
                return
            sock.setblocking(False)
            self.clients[sock.fileno()] = AdminClient(sock, time.monotonic() + READ_DEADLINE)

    def _read(self, client: AdminClient) -> None:
        try:
            chunk = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not chunk:
            self._drop(client)
            return
        client.request += chunk
        if b"\r\n\r\n" in client.request:
            self._respond(client, *self._answer(client.request))
        elif len(client.request) > MAX_REQUEST:
            self._respond(client, b"431 Request Header Fields Too Large", b"text/plain", b"request too large\n")

    def _answer(self, request: bytes) -> tuple[bytes, bytes, bytes]:
        method, _, rest = request.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":  # (a 405 names what is allowed: `_respond` adds the Allow header)
            return b"405 Method Not Allowed", b"text/plain", b"GET only\n"
        if path == b"/healthz":
            return b"200 OK", b"text/plain", b"ok\n"
        if path != b"/metrics":
            return b"404 Not Found", b"text/plain", b"try /metrics\n"
        try:
            return b"200 OK", CONTENT_TYPE_LATEST.encode(), self.metrics()
        except Exception:  # a bad snapshot must cost one scrape, never the master
            log.exception("event=metrics_failed")
            return b"500 Internal Server Error", b"text/plain", b"metrics failed; see the master log\n"

    def _respond(self, client: AdminClient, status: bytes, content_type: bytes, body: bytes) -> None:
        allow = b"Allow: GET\r\n" if status.startswith(b"405") else b""
        client.response = memoryview(HEAD % (status, content_type, len(body), allow) + body)
        client.deadline = time.monotonic() + WRITE_DEADLINE
        self._write(client)

    def _write(self, client: AdminClient) -> None:
        assert client.response is not None
        try:
            sent = client.sock.send(client.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.response = client.response[sent:]
        if not client.response:
            self._drop(client)

    def _drop(self, client: AdminClient) -> None:
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()
