"""Limits, timeouts and flow control of a real server over real sockets, each with the bug it would catch.

Every test here fails if its mechanism is broken: a body of exactly --max-body refused, a server that keeps reading
from a client that does not read, a read timeout or keep-alive timeout that never fires, a chunked body that escapes
--max-body, a pipelined burst past 16 KB that gets a false 431, an Upgrade header that loses an answer.
"""

from __future__ import annotations

import json
import select
import socket
import time

from conftest import Database, StartServer
from httpclient import raw, statuses

MAX_BODY = 200


def increment_of_size(key: str, value: int, size: int) -> bytes:
    body = json.dumps({"key": key, "value": value}).encode()
    assert len(body) <= size
    return body.ljust(size)  # trailing blanks are valid JSON


def post(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"POST /increment HTTP/1.1\r\nHost: x\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked_post(body: bytes, piece: int) -> bytes:
    parts = [body[i : i + piece] for i in range(0, len(body), piece)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    return b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + framed


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            part = sock.recv(65536)
        except TimeoutError:
            break
        if not part:
            return received
        received += part
    raise AssertionError(f"server did not close the connection; received {received!r}")


def test_body_of_exactly_max_body_is_accepted_and_one_byte_more_gets_413(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--max-body", str(MAX_BODY))
    exact = increment_of_size(prefix + "a", 5, MAX_BODY)
    assert statuses(raw(server.port, post(exact))) == [202]
    assert statuses(raw(server.port, chunked_post(exact, 64))) == [202]
    over = increment_of_size(prefix + "a", 1000, MAX_BODY + 1)
    assert statuses(raw(server.port, post(over) + post(exact))) == [413]
    assert server.stop() == 0
    assert database.total(prefix) == 10


def test_chunked_body_over_max_body_gets_413_and_counts_nothing(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--max-body", str(MAX_BODY))
    for piece in (1, 50, MAX_BODY + 1):
        over = increment_of_size(prefix + "b", 7, MAX_BODY + 1)
        answer = raw(server.port, chunked_post(over, piece), wait=5.0)
        assert statuses(answer) == [413], piece
    assert server.stop() == 0
    assert database.total(prefix) == 0


def test_client_that_stops_reading_makes_the_server_stop_reading(start_server: StartServer) -> None:
    server = start_server()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # a 34-byte request, a ~130-byte answer
    burst = request * 4096
    total = 48 * 1024 * 1024
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connect: a small window to fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        sent = 0
        # Send without reading until the server stops taking bytes for two seconds, or everything went.
        while sent < total:
            _, writable, _ = select.select([], [sock], [], 2.0)
            if not writable:
                break
            try:
                sent += sock.send(burst[sent % len(burst) :])  # the stream is the burst repeated: go on from here
            except BlockingIOError:
                continue
        # A server that kept reading would hold every answer in memory (about 170 MB here) and take all 48 MB.
        assert sent < total // 4, f"the server took {sent} bytes from a client that read nothing"
        # Reading again resumes the server: every whole request sent gets its answer, in order.
        sock.setblocking(True)
        sock.settimeout(10)
        sock.shutdown(socket.SHUT_WR)  # a half-close: the server answers what it has, then closes
        received = bytearray()
        while part := sock.recv(1 << 20):
            received += part
        answered = received.count(b"HTTP/1.1 200 OK\r\n")
        assert answered == sent // len(request), f"{answered} answers to {sent // len(request)} requests"


def test_half_sent_request_gets_408_after_the_read_timeout(start_server: StartServer) -> None:
    server = start_server("--read-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b'POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"key":')
        answer = read_until_closed(sock, time.monotonic() + 10)
    assert statuses(answer) == [408]


def test_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(start_server: StartServer) -> None:
    server = start_server("--keepalive-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(sock, time.monotonic() + 10)
    assert statuses(answer) == [200]
    assert b"Connection: close" not in answer  # kept alive, then closed for being idle


def test_two_hundred_pipelined_increments_in_one_write_are_all_answered_and_counted(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server()
    one = post(json.dumps({"key": prefix + "p", "value": 1}).encode(), b"Accept: */*")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(one * 200)
        received = b""
        while received.count(b"HTTP/1.1 ") < 200:
            part = sock.recv(65536)
            assert part, f"closed after {statuses(received)}"
            received += part
    assert statuses(received) == [202] * 200
    assert server.stop() == 0
    assert database.total(prefix) == 200


def test_upgrade_request_is_answered_like_any_other_and_nothing_is_counted_unanswered(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server()
    body = json.dumps({"key": prefix + "u", "value": 1}).encode()
    h2c = (b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in h2c) + b"\r\n"
    answer = raw(server.port, post(body) + post(body, *h2c) + get + post(body), wait=2.0)
    assert statuses(answer) == [202, 202, 200, 202]
    assert server.stop() == 0
    assert database.total(prefix) == 3
    assert "Fatal error" not in server.log and "Traceback" not in server.log
