"""HttpProtocol fed bytes directly (no socket): framing, limits, pipelining and the lean/full parser split.

These pin down parser edge cases deterministically, down to how the bytes are cut; tests/test_http.py repeats the
important ones against the real server over real sockets.
"""

from __future__ import annotations

import pytest

from fastcount.observability.stats import WorkerStats
from fastcount.server.protocol import ConnectionLimits, HttpProtocol, ServerState
from fastcount.server.responses import Response, json_response
from fastcount.server.routing import Route, Router

MAX_HEADER = 1024
MAX_BODY = 2048


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def echo(path: bytes, query: bytes, body: bytes) -> Response:
    return json_response(200, {"path": path.decode(), "query": query.decode(), "body": body.decode()})


def connect() -> tuple[HttpProtocol, FakeTransport]:
    router = Router([Route(b"POST", b"/echo", echo), Route(b"GET", b"/echo", echo)])
    limits = ConnectionLimits(max_body=MAX_BODY, max_header_bytes=MAX_HEADER, keepalive_ticks=2, read_ticks=3)
    protocol = HttpProtocol(ServerState(router, limits, WorkerStats()))
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a byte stream, using Content-Length framing."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
        found.append((status, rest[:length]))
        data = rest[length:]
    return found


def post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /echo HTTP/1.1\r\nHost: x\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def feed(protocol: HttpProtocol, *chunks: bytes) -> None:
    for chunk in chunks:
        protocol.data_received(chunk)


def test_pipelined_requests_are_answered_in_order_in_one_write() -> None:
    protocol, transport = connect()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    feed(protocol, post(b"one") + post(b"two") + b"GET /echo?x=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(writes) == 1
    assert [body for _, body in responses(writes[0])] == [
        b'{"path":"/echo","query":"","body":"one"}',
        b'{"path":"/echo","query":"","body":"two"}',
        b'{"path":"/echo","query":"x=3","body":""}',
    ]


@pytest.mark.parametrize("cut", [1, 2, 7, 30, 64])
def test_requests_cut_anywhere_parse_the_same(cut: int) -> None:
    protocol, transport = connect()
    stream = post(b"abc") + post(b"defgh") + post(b"")
    feed(protocol, *[stream[i : i + cut] for i in range(0, len(stream), cut)])
    assert [body for _, body in responses(transport.written)] == [
        b'{"path":"/echo","query":"","body":"abc"}',
        b'{"path":"/echo","query":"","body":"defgh"}',
        b'{"path":"/echo","query":"","body":""}',
    ]
    assert not transport.closed


def test_chunked_request_body_is_reassembled() -> None:
    protocol, transport = connect()
    feed(
        protocol,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert responses(transport.written) == [(200, b'{"path":"/echo","query":"","body":"abcde"}')]


def test_malformed_request_gets_400_and_close() -> None:
    protocol, transport = connect()
    feed(protocol, b"NOT HTTP AT ALL\r\n\r\n")
    assert responses(transport.written)[0][0] == 400
    assert transport.closed


def test_unknown_path_404_and_wrong_method_405_with_allow() -> None:
    protocol, transport = connect()
    feed(protocol, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nDELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [status for status, _ in responses(transport.written)] == [404, 405]
    assert b"Allow: GET, POST\r\n" in transport.written
    assert not transport.closed


def test_header_section_at_the_limit_passes_and_one_byte_more_gets_431() -> None:
    base = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
    fits = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (MAX_HEADER - len(base)))
    assert len(fits) == MAX_HEADER
    for cut in (len(fits), 100, 1):
        protocol, transport = connect()
        feed(protocol, *[fits[i : i + cut] for i in range(0, len(fits), cut)])
        assert responses(transport.written)[0][0] == 200, f"cut={cut}"
    too_big = fits.replace(b"X-Pad: ", b"X-Pad: p")
    for cut in (len(too_big), 100, 1):
        protocol, transport = connect()
        feed(protocol, *[too_big[i : i + cut] for i in range(0, len(too_big), cut)])
        assert responses(transport.written)[0][0] == 431, f"cut={cut}"
        assert transport.closed


def test_small_request_behind_pipelined_ones_is_not_mistaken_for_a_large_header() -> None:
    protocol, transport = connect()
    earlier = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" * 30  # most of a slice of earlier requests
    late = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 200 + b"\r\n\r\n"
    stream = earlier[: MAX_HEADER - 40] + earlier[MAX_HEADER - 40 :] + late
    feed(protocol, stream[:MAX_HEADER], stream[MAX_HEADER:])
    assert [status for status, _ in responses(transport.written)] == [200] * 31


def test_endless_header_line_is_cut_off_with_431() -> None:
    protocol, transport = connect()
    feed(protocol, b"GET /echo HTTP/1.1\r\nX-Long: ")
    for _ in range(5):
        feed(protocol, b"z" * 500)
    assert responses(transport.written)[0][0] == 431
    assert transport.closed


def test_body_over_the_limit_gets_413() -> None:
    protocol, transport = connect()
    feed(protocol, post(b"b" * (MAX_BODY + 1)))
    assert responses(transport.written)[0][0] == 413
    assert transport.closed


def test_expect_continue_gets_100_before_the_final_response() -> None:
    protocol, transport = connect()
    feed(protocol, post(b"", b"Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: 2"))
    assert transport.written.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    feed(protocol, b"ok")
    assert responses(transport.written.split(b"\r\n\r\n", 1)[1])[0] == (200, b'{"path":"/echo","query":"","body":"ok"}')


def test_expect_continue_with_too_large_content_length_gets_413_not_100() -> None:
    protocol, transport = connect()
    feed(protocol, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999\r\n\r\n")
    assert responses(transport.written)[0][0] == 413


def test_connection_close_is_honoured_and_later_requests_ignored() -> None:
    protocol, transport = connect()
    feed(protocol, post(b"1", b"Connection: close\r\n") + post(b"2"))
    assert [status for status, _ in responses(transport.written)] == [200]
    assert b"Connection: close\r\n" in transport.written
    assert transport.closed


def test_http10_closes_by_default_and_keeps_alive_when_asked() -> None:
    protocol, transport = connect()
    feed(protocol, b"GET /echo HTTP/1.0\r\n\r\n")
    assert transport.closed and b"Connection: close" in transport.written
    protocol, transport = connect()
    feed(protocol, b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert not transport.closed and b"Connection: keep-alive\r\n" in transport.written


def test_idle_connection_is_closed_after_the_keepalive_timeout() -> None:
    protocol, transport = connect()
    feed(protocol, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    protocol.on_tick()  # bytes arrived during this tick
    protocol.on_tick()
    assert not transport.closed
    protocol.on_tick()
    assert transport.closed


def test_slow_request_gets_408_after_the_read_timeout() -> None:
    protocol, transport = connect()
    feed(protocol, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    for tick in range(1, 4):
        feed(protocol, b"d" if tick < 3 else b"")  # trickling bytes does not extend the deadline
        protocol.on_tick()
    assert not transport.closed
    protocol.on_tick()
    assert responses(transport.written)[0][0] == 408
    assert transport.closed
