"""HttpProtocol state that outlives one request, fed bytes directly: a second stall pauses reading again, an
asynchronous answer that closes the connection ends what is handled, a connection that never sent a byte still times
out, and the per-connection counts reach the worker's stats. (Found by mutation testing: tools/mutate.py.)"""

from __future__ import annotations

import asyncio
import time

from test_protocol import FakeTransport, RecordingTransport, echo, responses

from fastcount.observability.stats import WorkerStats
from fastcount.server.protocol import ConnectionLimits, HttpProtocol, ServerState
from fastcount.server.responses import Response, json_response
from fastcount.server.routing import Route, Router

LIMITS = ConnectionLimits(max_body=2048, max_header_bytes=1024, keepalive_ticks=2, read_ticks=3)
GET = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"


def test_reading_pauses_again_on_a_second_stall_after_a_resume() -> None:
    protocol = HttpProtocol(ServerState(Router([Route(b"GET", b"/echo", echo)]), LIMITS, WorkerStats()))
    transport = RecordingTransport(protocol, high_water=16_384)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    received = b""
    for stall in (1, 2):
        protocol.data_received(GET * 5_000)
        assert transport.pauses == stall and transport.paused, f"stall {stall}: the server must stop reading"
        while transport.written:
            received += transport.drain()
        assert not transport.paused
    assert [status for status, _ in responses(received)] == [200] * 10_000


def test_an_asynchronous_answer_with_connection_close_ends_what_is_handled() -> None:
    handled: list[bytes] = []

    async def slow(path: bytes, query: bytes, body: bytes) -> Response:
        await asyncio.sleep(0)
        return json_response(200, {"slow": True})

    def count(path: bytes, query: bytes, body: bytes) -> Response:
        handled.append(body)
        return Response(202)

    async def scenario() -> FakeTransport:
        router = Router([Route(b"GET", b"/slow", slow), Route(b"POST", b"/count", count)])
        protocol = HttpProtocol(ServerState(router, LIMITS, WorkerStats()))
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        counted = b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + counted + counted)
        for _ in range(100):
            if transport.closed:
                break
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(scenario())
    assert transport.closed
    assert [status for status, _ in responses(transport.written)] == [200]
    assert handled == [], "a request after `Connection: close` is neither answered nor handled (nor counted)"


def test_a_connection_that_never_sent_a_byte_is_closed_after_the_keepalive_timeout() -> None:
    protocol = HttpProtocol(ServerState(Router([Route(b"GET", b"/echo", echo)]), LIMITS, WorkerStats()))
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.on_tick()
    assert not transport.closed
    protocol.on_tick()
    assert transport.closed


def test_per_connection_counts_reach_the_worker_stats() -> None:
    stats = WorkerStats()
    router = Router([Route(b"GET", b"/echo", echo, name="echo")])
    state = ServerState(router, LIMITS, stats)
    protocol = HttpProtocol(state)
    transport = FakeTransport()
    started = time.perf_counter()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    data = GET * 3 + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    protocol.data_received(data)
    protocol.on_tick()
    elapsed = time.perf_counter() - started
    assert (stats.connections_opened, stats.requests) == (1, 4)
    assert (stats.bytes_received, stats.bytes_sent) == (len(data), len(transport.written))
    [echo_route] = [route for route in router.routes if route.name == "echo"]
    assert echo_route.answers == {200: 3}
    # The one read was timed (the first of a connection always is): a duration inside the test's own span.
    assert sum(stats.request_seconds.counts) == 1 and 0 <= stats.request_seconds.total <= elapsed
    protocol.connection_lost(None)
    assert stats.connections_closed == 1
