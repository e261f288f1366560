"""The admin listener the master serves from its own loop: GET /metrics (Prometheus text format) and GET /healthz.

The master has no event loop and must start no thread, so this is a plain non-blocking listening socket that joins
the master's select(); each scrape is read and answered at once, with a short timeout so a stuck client cannot hold
the master. It is meant for 127.0.0.1 and a scraper, not for the public.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 1.0
MAX_REQUEST = 8192


class AdminServer:
    def __init__(self, host: str, port: int, metrics: Callable[[], bytes]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.metrics = metrics

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def handle_pending(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except BlockingIOError:
                return
            with client:
                try:
                    self._answer(client)
                except OSError as error:
                    log.debug("event=admin_client_error error=%r", str(error))

    def _answer(self, client: socket.socket) -> None:
        client.settimeout(CLIENT_TIMEOUT)
        request = b""
        while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
            chunk = client.recv(4096)
            if not chunk:
                return
            request += chunk
        method, _, rest = request.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            status, content_type, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
        elif path == b"/metrics":
            status, content_type, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), self.metrics()
        elif path == b"/healthz":
            status, content_type, body = b"200 OK", b"text/plain", b"ok\n"
        else:
            status, content_type, body = b"404 Not Found", b"text/plain", b"try /metrics\n"
        head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        client.sendall(head % (status, content_type, len(body)) + body)
