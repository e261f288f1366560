"""Random request streams, cut into random reads, answered as a model says: statuses, order, counts.

A stream is a list of requests (increments plain, chunked, with Expect or an Upgrade header, CONNECT, bad JSON,
unknown paths, wrong methods, slow async reads, heads and bodies at and past the limits, Connection: close,
garbage). The model knows each request's answer and whether it ends the connection; whatever the cuts, the protocol
must give exactly the model's answers in order and count exactly the increments it answered 202, the same as one
request per write. Most examples drive HttpProtocol with a fake transport; fewer go over a real server's socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocol import FakeTransport, responses

from fastcount.observability.stats import WorkerStats
from fastcount.server.protocol import ConnectionLimits, HttpProtocol, ServerState
from fastcount.server.responses import Response, constant_error, json_response
from fastcount.server.routing import Route, Router

from conftest import Database, StartServer

MAX_HEADER = 1024
MAX_BODY = 512
ACCEPTED = Response(202, cacheable=True)
BAD_JSON = constant_error(400, "body must be JSON")


@dataclass(frozen=True)
class Request:
    data: bytes
    answers: tuple[int, ...]  # statuses, interim 100 included
    closes: bool = False
    counted: tuple[str, int] | None = None  # (key, value) an answered 202 adds


def increment_body(key: str, value: int, size: int = 0) -> bytes:
    return json.dumps({"key": key, "value": value}).encode().ljust(size)  # JSON allows trailing blanks


def head(method: bytes, target: bytes, *headers: bytes) -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def with_length(method: bytes, target: bytes, body: bytes, *headers: bytes) -> bytes:
    return head(method, target, *headers, b"Content-Length: %d" % len(body)) + body


def chunked(body: bytes, pieces: int) -> bytes:
    size = max(1, -(-len(body) // pieces))
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def padded_head(total: int) -> bytes:
    """A GET /healthz head of exactly `total` bytes (request line, headers, blank line)."""
    base = head(b"GET", b"/healthz", b"X-Pad: ")
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (total - len(base)))


@st.composite
def requests(draw: st.DrawFn, key_prefix: str, async_path: bytes) -> Request:
    key = key_prefix + draw(st.sampled_from("abc"))
    value = draw(st.integers(1, 1000))
    body = increment_body(key, value)
    kind = draw(
        st.sampled_from(
            ["inc", "inc", "inc", "chunked", "expect", "upgrade", "upgrade_get", "upgrade_too_big", "connect_too_big",
             "bad_json", "not_found", "wrong_method", "read", "head_fits", "head_too_big", "body_fits", "body_too_big",
             "chunked_too_big", "close", "garbage"]
        )
    )  # fmt: skip
    if kind == "inc":
        return Request(with_length(b"POST", b"/increment", body), (202,), counted=(key, value))
    if kind == "chunked":
        pieces = draw(st.integers(1, 5))
        data = head(b"POST", b"/increment", b"Transfer-Encoding: chunked") + chunked(body, pieces)
        return Request(data, (202,), counted=(key, value))
    if kind == "expect":
        return Request(
            with_length(b"POST", b"/increment", body, b"Expect: 100-continue"), (100, 202), counted=(key, value)
        )
    if kind == "upgrade":
        data = with_length(b"POST", b"/increment", body, b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                           b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")  # fmt: skip
        return Request(data, (202,), counted=(key, value))
    if kind == "upgrade_get":
        return Request(head(b"GET", b"/healthz", b"Connection: upgrade", b"Upgrade: websocket"), (200,))
    if kind == "upgrade_too_big":  # the upgrade is refused like any request: its body is measured (helper-24's case)
        data = with_length(b"POST", b"/increment", b"x" * (MAX_BODY + 1), b"Connection: upgrade", b"Upgrade: h2c")
        return Request(data, (413,), closes=True)
    if kind == "connect_too_big":
        return Request(b"CONNECT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n", (413,), closes=True)
    if kind == "bad_json":
        return Request(with_length(b"POST", b"/increment", b"{not json"), (400,))
    if kind == "not_found":
        return Request(head(b"GET", b"/nowhere"), (404,))
    if kind == "wrong_method":
        return Request(head(b"GET", b"/increment"), (405,))
    if kind == "read":
        return Request(head(b"GET", async_path), (404,))
    if kind == "head_fits":
        return Request(padded_head(draw(st.integers(len(padded_head(0)), MAX_HEADER))), (200,))
    if kind == "head_too_big":
        return Request(padded_head(draw(st.integers(MAX_HEADER + 1, MAX_HEADER * 3))), (431,), closes=True)
    if kind == "body_fits":
        data = with_length(b"POST", b"/increment", increment_body(key, value, MAX_BODY))
        return Request(data, (202,), counted=(key, value))
    if kind == "body_too_big":
        return Request(
            with_length(b"POST", b"/increment", increment_body(key, value, MAX_BODY + 1)), (413,), closes=True
        )
    if kind == "chunked_too_big":
        data = head(b"POST", b"/increment", b"Transfer-Encoding: chunked") + chunked(
            increment_body(key, value, MAX_BODY + draw(st.integers(1, 300))), draw(st.integers(1, 4))
        )
        return Request(data, (413,), closes=True)
    if kind == "close":
        return Request(with_length(b"POST", b"/increment", body, b"Connection: close"), (202,), True, (key, value))
    return Request(b"NOT HTTP\r\n\r\n", (400,), closes=True)


def model(stream: list[Request]) -> tuple[list[int], dict[str, int], bool]:
    """Statuses, counts and whether the connection closes, as the requests say."""
    statuses: list[int] = []
    counts: dict[str, int] = {}
    for request in stream:
        statuses.extend(request.answers)
        if request.counted is not None:
            key, value = request.counted
            counts[key] = counts.get(key, 0) + value
        if request.closes:
            return statuses, counts, True
    return statuses, counts, False


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(point % (len(data) + 1) for point in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the protocol with a fake transport -------------------------------------------------------------------------------


def fake_app() -> tuple[Router, dict[str, int]]:
    counts: dict[str, int] = {}

    def increment(path: bytes, query: bytes, body: bytes) -> Response:
        try:
            document = json.loads(body)
        except ValueError:
            return BAD_JSON
        counts[document["key"]] = counts.get(document["key"], 0) + document["value"]
        return ACCEPTED

    async def read(path: bytes, query: bytes, body: bytes) -> Response:
        await asyncio.sleep(0)
        return json_response(404, {"error": "unknown key"})

    def health(path: bytes, query: bytes, body: bytes) -> Response:
        return json_response(200, {"status": "ok"}, cacheable=True)

    routes = [
        Route(b"POST", b"/increment", increment),
        Route(b"GET", b"/counters/", read, prefix=True),
        Route(b"GET", b"/healthz", health),
    ]
    return Router(routes), counts


def run_fake(chunks: list[bytes], expected: int) -> tuple[list[int], dict[str, int], bool]:
    router, counts = fake_app()
    limits = ConnectionLimits(max_body=MAX_BODY, max_header_bytes=MAX_HEADER, keepalive_ticks=5, read_ticks=10)

    async def scenario() -> FakeTransport:
        protocol = HttpProtocol(ServerState(router, limits, WorkerStats()))
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        for chunk in chunks:
            if not transport.closed:
                protocol.data_received(chunk)
            await asyncio.sleep(0)
        deadline = loop.time() + 10
        while len(responses(transport.written)) < expected and not transport.closed and loop.time() < deadline:
            await asyncio.sleep(0.001)
        return transport

    transport = asyncio.run(scenario())
    return [status for status, _ in responses(transport.written)], counts, transport.closed


stream_strategy = st.lists(requests("k", b"/counters/never"), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(stream=stream_strategy, points=st.lists(st.integers(0, 100_000), max_size=12))
def test_any_split_of_any_stream_gets_the_models_answers(stream: list[Request], points: list[int]) -> None:
    statuses, counts, closes = model(stream)
    data = b"".join(request.data for request in stream)
    assert run_fake(cut(data, points), len(statuses)) == (statuses, counts, closes)
    assert run_fake([request.data for request in stream], len(statuses)) == (statuses, counts, closes)


# -- a real server over a socket ---------------------------------------------------------------------------------------


def complete_statuses(data: bytes) -> list[int]:
    """Statuses of the complete responses at the start of a stream that may end in the middle of one."""
    found = []
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end == -1:
            return found
        lines = data[:head_end].split(b"\r\n")
        length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
        if len(data) < head_end + 4 + length:
            return found
        found.append(int(lines[0].split()[1]))
        data = data[head_end + 4 + length :]


def exchange(port: int, chunks: list[bytes], expected: int) -> list[int]:
    """Send the chunks as separate writes; read until `expected` answers came or the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early: fine
                break
        received = b""
        while len(complete_statuses(received)) < expected:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            received += part
        if len(complete_statuses(received)) == expected:  # nothing more may come: wait briefly for a stray answer
            sock.settimeout(0.05)
            try:
                received += sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                pass
    return complete_statuses(received)


def test_real_server_answers_random_split_streams_like_the_model(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--max-body", str(MAX_BODY), "--max-header-bytes", str(MAX_HEADER))
    expected_totals: dict[str, int] = {}

    @settings(max_examples=30, deadline=None)
    @given(
        stream=st.lists(requests(prefix, b"/counters/" + prefix.encode() + b"never"), min_size=1, max_size=8),
        points=st.lists(st.integers(0, 100_000), max_size=8),
    )
    def check(stream: list[Request], points: list[int]) -> None:
        statuses, counts, _ = model(stream)
        assert exchange(server.port, cut(b"".join(r.data for r in stream), points), len(statuses)) == statuses
        for key, value in counts.items():
            expected_totals[key] = expected_totals.get(key, 0) + value

    check()
    assert server.stop() == 0
    assert database.counts(prefix) == expected_totals
