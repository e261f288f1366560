"""The HTTP/1.1 connection: an asyncio.Protocol driven by httptools parser callbacks.

It owns keep-alive, pipelining (responses leave in request order, one write per batch of pipelined requests), the
size limits, flow control and the idle and read timeouts. It knows routes only as handlers; what they count is not
its business.

Rules it keeps:
1. Every request gets exactly one final response, in the order the requests arrived.
2. After a response that says `Connection: close`, nothing more is read or answered on that connection.
3. No timer per request: the worker's one-second tick calls `on_tick`, which enforces both timeouts (to within
   a second) from counts the request path keeps anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

import httptools

from fastcount.server.responses import CONTINUE, Response, ResponseRenderer, constant_error

if TYPE_CHECKING:
    from fastcount.observability.stats import WorkerStats
    from fastcount.server.routing import Router, RouteState

log = logging.getLogger(__name__)

WATCHED_HEADER_LENGTHS = frozenset({len(b"content-length"), len(b"expect")})
MAX_QUEUED_RESPONSES = 64  # pipelined requests waiting behind a slow (async) one before we stop reading

BAD_REQUEST = constant_error(400, "malformed HTTP request")
BODY_TOO_LARGE = constant_error(413, "request body too large")
HEADERS_TOO_LARGE = constant_error(431, "request header section too large")
REQUEST_TIMEOUT = constant_error(408, "request not received in time")
INTERNAL_ERROR = constant_error(500, "internal error")
UPGRADE_REFUSED = constant_error(400, "protocol upgrade is not supported")


@dataclass(frozen=True)
class ConnectionLimits:
    max_body: int
    max_header_bytes: int
    keepalive_ticks: int  # whole ticks (seconds) an idle keep-alive connection lives
    read_ticks: int  # whole ticks a client has to finish sending one request
    tcp_nodelay: bool = True


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = ("connections", "limits", "renderer", "router", "stats", "stopping")

    def __init__(self, router: Router, limits: ConnectionLimits, stats: WorkerStats) -> None:
        self.router = router
        self.renderer = ResponseRenderer(router.routes)
        self.limits = limits
        self.stats = stats
        self.connections: set[HttpProtocol] = set()
        self.stopping = False


class RequestRejected(Exception):
    """Raised inside a parser callback to abort the connection with a final response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _LeanCallbacks:
    """The parser callbacks minus on_header. httptools builds header name and value objects and calls into Python
    once per header only when on_header exists; leaving it out saves about a microsecond per request (measured)."""

    __slots__ = ("on_body", "on_headers_complete", "on_message_begin", "on_message_complete", "on_url")

    def __init__(self, protocol: HttpProtocol) -> None:
        self.on_message_begin = protocol.on_message_begin
        self.on_url = protocol.on_url
        self.on_headers_complete = protocol.on_headers_complete
        self.on_body = protocol.on_body
        self.on_message_complete = protocol.on_message_complete


class HttpProtocol(asyncio.Protocol):
    """One client connection.

    Header handling without per-header callbacks: input is parsed in slices of at most --max-header-bytes, and a
    message that starts at a slice boundary with no `100-` in the slice goes to the lean parser (no on_header). A
    header section that completes inside the slice it began in is therefore within the limit; one that runs past its
    slice is measured from the raw bytes (`_count_unfinished_headers`). Slices that may carry `Expect: 100-continue`
    go to the full parser, which sees each header.
    """

    __slots__ = (
        # per connection
        "state",
        "transport",
        "lean_parser",
        "full_parser",
        "parser",
        "out",
        "queue",
        "closing",
        "reading_paused",
        "writing_paused",
        "quiet_ticks",
        "stalled_ticks",
        "bytes_in",
        "bytes_out",
        "requests",
        "http10",
        # per request
        "in_message",
        "url",
        "body",
        "body_size",
        "headers_done",
        "unfinished_header_bytes",
        "header_tail",
        "current_slice",
        "content_length",
        "expect_continue",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.lean_parser = httptools.HttpRequestParser(_LeanCallbacks(self))
        self.full_parser = httptools.HttpRequestParser(self)
        self.parser = self.lean_parser  # the one the current message is fed to
        self.out: list[bytes] = []  # responses to write when the current data_received returns
        # [bytes | Task, keep_alive, http10] entries waiting behind an unfinished (async) response
        self.queue: deque[list[object]] | None = None
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.quiet_ticks = 0  # ticks in a row with no byte received
        self.stalled_ticks = 0  # ticks in a row with a request unfinished and none completed
        self.bytes_in = 0  # per-connection counts, moved into the worker's stats on each tick
        self.bytes_out = 0
        self.requests = 0
        self.http10: bool | None = None  # learnt from the first request
        self.in_message = False
        self.url: bytes | None = None
        self.body: bytes | None = None
        self.body_size = 0
        self.headers_done = False
        self.unfinished_header_bytes = 0  # of a header section that ran past the slice it began in
        self.header_tail = b""  # the last bytes of the previous slice, while such a section is open
        self.current_slice = b""
        self.content_length = -1  # seen by the full parser only
        self.expect_continue = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.state.limits.tcp_nodelay:  # uvloop turns TCP_NODELAY on for every accepted socket
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        self.state.connections.add(self)
        self.state.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.state.stats.connections_closed += 1
        self.publish_counts()
        self.closing = True
        if self.queue:
            for entry in self.queue:
                if isinstance(entry[0], asyncio.Task):
                    entry[0].cancel()
        self.queue = None

    def eof_received(self) -> bool | None:
        if self.queue:  # half-closed with answers still coming: send them, then close
            self.closing = True
            self.queue.append([b"", False, False])
            return True
        return None

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.bytes_in += len(data)
        sampled = not self.requests & 15  # time one read in 16 or so: the clock is not free
        if sampled:
            started = perf_counter()
        if not self.in_message and len(data) <= self.state.limits.max_header_bytes and b"100-" not in data:
            # The common case, inline: whole requests in one read, lean parser.
            self.parser = parser = self.lean_parser
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as error:
                self._parse_failed(error)
            else:
                if self.in_message and not self.headers_done:
                    self._count_unfinished_headers(data, True)
        else:
            step = self.state.limits.max_header_bytes
            for start in range(0, len(data), step):
                if self.closing:
                    break
                self._feed_slice(data[start : start + step] if len(data) > step else data)
        out = self.out
        if out:
            if len(out) == 1 and not self.closing:  # the common case: one request in, one response out
                response = out.pop()
                self.transport.write(response)  # type: ignore[union-attr]
                self.bytes_out += len(response)
            else:
                self._write_out()
        if sampled:
            self.state.stats.request_seconds.observe(perf_counter() - started)

    def _feed_slice(self, data: bytes) -> None:
        began_here = not self.in_message
        if began_here:
            self.parser = self.full_parser if b"100-" in data else self.lean_parser
        elif self.unfinished_header_bytes and b"100-" in data and self.parser is self.lean_parser:
            self.expect_continue = True  # an Expect header in a continuation of a lean message (approximate)
        if self.unfinished_header_bytes:
            self.current_slice = data  # on_headers_complete measures the rest of the header section in it
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._parse_failed(error)
            return
        if self.in_message and not self.headers_done:
            self._count_unfinished_headers(data, began_here)

    def _count_unfinished_headers(self, data: bytes, began_here: bool) -> None:
        """A header section is still open after this slice: add what arrived of it and enforce the limit.

        In the slice where the message began, it is what follows the previous header section's end (exact unless the
        previous request had a body, which is then counted too); in later slices, all of it.
        """
        if began_here and not self.unfinished_header_bytes:
            previous_end = data.rfind(b"\r\n\r\n")
            self.unfinished_header_bytes = len(data) - (previous_end + 4 if previous_end != -1 else 0)
        else:
            self.unfinished_header_bytes += len(data)
        self.header_tail = data[-3:]
        if self.unfinished_header_bytes > self.state.limits.max_header_bytes:
            self._answer(HEADERS_TOO_LARGE, False)

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        if isinstance(error, httptools.HttpParserCallbackError):
            rejected = error.__context__
            self._answer(rejected.response if isinstance(rejected, RequestRejected) else BAD_REQUEST, False)
        elif isinstance(error, httptools.HttpParserUpgrade):
            self._answer(UPGRADE_REFUSED, False)
        elif not self.closing:  # data after a `Connection: close` request is the client's problem, not a 400
            self._answer(BAD_REQUEST, False)

    # -- httptools callbacks ----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        if self.url is None:
            self.url = url
        else:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:  # the full parser only
        if len(name) in WATCHED_HEADER_LENGTHS:
            name = name.lower()
            if name == b"content-length":
                self.content_length = int(value)
            elif name == b"expect":
                self.expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.unfinished_header_bytes:
            self._finish_header_count()
        if self.content_length != -1:
            if self.content_length > self.state.limits.max_body:
                raise RequestRejected(BODY_TOO_LARGE)
            self.content_length = -1
        if self.expect_continue:
            self.expect_continue = False
            if self.parser.get_http_version() != "1.0":
                self._answer_interim(CONTINUE)

    def _finish_header_count(self) -> None:
        # The slice being parsed holds the rest of a header section that began in an earlier slice: up to its first
        # blank line, looked for together with the previous slice's last bytes in case the terminator was split.
        tail, rest = self.header_tail, self.current_slice
        end = (tail + rest).find(b"\r\n\r\n")
        in_this_slice = end + 4 - len(tail) if end != -1 else len(rest)
        total = self.unfinished_header_bytes + in_this_slice
        self.unfinished_header_bytes = 0
        self.header_tail = self.current_slice = b""
        if total > self.state.limits.max_header_bytes:
            raise RequestRejected(HEADERS_TOO_LARGE)

    def on_body(self, chunk: bytes) -> None:
        size = self.body_size + len(chunk)
        if size > self.state.limits.max_body:
            raise RequestRejected(BODY_TOO_LARGE)
        self.body_size = size
        self.body = chunk if self.body is None else self.body + chunk

    def on_message_complete(self) -> None:
        # The hot path: written flat, because every call and attribute here is paid on every request.
        if self.closing:
            return
        state = self.state
        url = self.url or b"/"
        body = self.body or b""
        # Per-request state resets here, in one place (content_length and expect_continue reset where they are used).
        self.in_message = False
        self.url = None
        if self.body is not None:
            self.body = None
            self.body_size = 0
        self.headers_done = False
        self.requests += 1
        keep_alive = self.parser.should_keep_alive() and not state.stopping
        http10 = self.http10
        if http10 is None:
            http10 = self.http10 = self.parser.get_http_version() == "1.0"
        http10_keep_alive = http10 and keep_alive

        table = state.router.exact.get(url)
        route = table.get(self.parser.get_method()) if table is not None else None
        if route is None:
            path, query, target = state.router.resolve_target(self.parser.get_method(), url)
            if isinstance(target, Response):
                self._answer(target, keep_alive, http10_keep_alive, state.router.unmatched)
                return
            route = target
        else:
            path, query = url, b""
        try:
            result = route.handler(path, query, body)
        except Exception:
            log.exception("event=handler_error path=%r", path)
            result = INTERNAL_ERROR
        if not isinstance(result, Response):
            self._answer_later(asyncio.ensure_future(result), keep_alive, http10_keep_alive, route)
            return
        if result.cacheable and not http10_keep_alive and self.queue is None:
            entry = (route.keep_alive_cache if keep_alive else route.close_cache).get(result)
            if entry is None:
                entry = state.renderer.cache_entry(route, result, keep_alive)
            entry[1] += 1  # type: ignore[operator]  # counted per route; the tick moves it into route.answers
            self.out.append(entry[0])  # type: ignore[arg-type]
            if not keep_alive:
                self.closing = True
            return
        self._answer(result, keep_alive, http10_keep_alive, route)

    # -- answering --------------------------------------------------------------------------------------------------

    def _render(self, response: Response, keep_alive: bool, http10_keep_alive: bool, route: RouteState) -> bytes:
        renderer = self.state.renderer
        http10_keep_alive = http10_keep_alive and keep_alive
        if response.cacheable and not http10_keep_alive:
            entry = renderer.cache_entry(route, response, keep_alive)
            entry[1] += 1  # type: ignore[operator]
            return entry[0]  # type: ignore[return-value]
        route.count(response.status)
        return renderer.render(response, keep_alive, http10_keep_alive)

    def _answer(
        self, response: Response, keep_alive: bool, http10_keep_alive: bool = False, route: RouteState | None = None
    ) -> None:
        data = self._render(response, keep_alive, http10_keep_alive, route or self.state.router.invalid)
        if self.queue:
            self.queue.append([data, keep_alive, False])
        else:
            self.out.append(data)
        if not keep_alive:
            self.closing = True

    def _answer_interim(self, data: bytes) -> None:
        if self.queue:
            self.queue.append([data, True, False])
        else:
            self.out.append(data)
            self._write_out()

    def _answer_later(
        self, task: asyncio.Future[Response], keep_alive: bool, http10_keep_alive: bool, route: RouteState
    ) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append([task, keep_alive, http10_keep_alive, route])
        if not keep_alive:
            self.closing = True
        task.add_done_callback(self._drain_queue)
        self._update_reading()

    def _drain_queue(self, _task: object = None) -> None:
        queue = self.queue
        if queue is None or self.transport is None:
            return
        # What was answered synchronously before the first queued entry goes first.
        self._write_out()
        while queue:
            entry = queue[0]
            item = entry[0]
            if isinstance(item, asyncio.Future):
                if not item.done():
                    break
                try:
                    response = item.result()
                except Exception:
                    log.exception("event=handler_error")
                    response = INTERNAL_ERROR
                data = self._render(response, bool(entry[1]), bool(entry[2]), entry[3])  # type: ignore[arg-type]
            else:
                data = item  # type: ignore[assignment]
            queue.popleft()
            if data:
                self.transport.write(data)
                self.bytes_out += len(data)
            if not entry[1]:
                self.transport.close()
                self.queue = None
                return
        self._update_reading()

    def _write_out(self) -> None:
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        assert transport is not None
        transport.write(data)
        self.bytes_out += len(data)
        if self.closing and not self.queue:
            transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        should_pause = self.writing_paused or (self.queue is not None and len(self.queue) >= MAX_QUEUED_RESPONSES)
        if should_pause and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not should_pause and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    # -- the worker's tick ------------------------------------------------------------------------------------------

    def publish_counts(self) -> None:
        """Move this connection's plain-int counts into the worker's stats (on each tick, not per request)."""
        stats = self.state.stats
        stats.requests += self.requests
        stats.bytes_received += self.bytes_in
        stats.bytes_sent += self.bytes_out
        self.requests = self.bytes_in = self.bytes_out = 0

    def on_tick(self) -> None:
        """Enforce timeouts; while the worker stops, close connections that have gone quiet."""
        self.quiet_ticks = 0 if self.bytes_in else self.quiet_ticks + 1
        self.stalled_ticks = self.stalled_ticks + 1 if self.in_message and not self.requests else 0
        self.publish_counts()
        if self.closing or self.transport is None:
            return
        limits = self.state.limits
        if self.in_message:
            if self.stalled_ticks > limits.read_ticks:
                self._answer(REQUEST_TIMEOUT, False)
                self._write_out()
            return
        if self.queue:
            return
        # While stopping, a client that sent nothing for a whole tick (a second) is not mid-request: closing it
        # cannot cut a request in flight the way closing a connection that just got its answer could.
        if self.quiet_ticks >= limits.keepalive_ticks or (self.state.stopping and self.quiet_ticks >= 1):
            self.closing = True
            self.transport.close()
