"""Small HTTP helpers over real sockets: http.client for ordinary requests, raw sockets for protocol edge cases."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time


def request(port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def increment(conn: http.client.HTTPConnection, key: str, value: int) -> int:
    conn.request("POST", "/increment", body=json.dumps({"key": key, "value": value}).encode())
    response = conn.getresponse()
    response.read()
    return response.status


def raw(port: int, data: bytes, wait: float = 0.5, chunks: list[bytes] | None = None) -> bytes:
    """Send bytes as given (optionally in separate writes) and read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for chunk in chunks or [data]:
            sock.sendall(chunk)
            if chunks:
                time.sleep(0.01)
        sock.settimeout(wait)
        received = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                received += part
        except TimeoutError:
            pass
        return received


def statuses(response_bytes: bytes) -> list[int]:
    """Status codes of the responses in a stream (our bodies are JSON and never hold a status line)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", response_bytes)]
