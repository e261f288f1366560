"""The HTTP/1.1 connection: an asyncio.Protocol driven by httptools parser callbacks.

It owns keep-alive, pipelining (responses leave in request order, one write per batch of pipelined requests), the
size limits, flow control and the idle and read timeouts. It knows routes only as handlers; what they count is not
its business.

Rules it keeps:
1. Every request gets exactly one final response, in the order the requests arrived.
2. After a response that says `Connection: close`, nothing more is read or answered on that connection.
3. No timer per request: the worker's one-second tick calls `on_tick`, which enforces both timeouts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from fastcount.server.responses import CONTINUE, Response, ResponseRenderer, constant_error

if TYPE_CHECKING:
    from fastcount.observability.stats import WorkerStats
    from fastcount.server.routing import Router

log = logging.getLogger(__name__)

MAX_QUEUED_RESPONSES = 64  # pipelined requests waiting behind a slow (async) one before we stop reading
PARTIAL_HEADER_GUARD = 1 << 20  # bytes of an unfinished header section we buffer at most, whatever the chunking

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


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = ("connections", "limits", "renderer", "router", "stats", "stopping", "tick")

    def __init__(self, router: Router, limits: ConnectionLimits, stats: WorkerStats) -> None:
        self.router = router
        self.renderer = ResponseRenderer()
        self.limits = limits
        self.stats = stats
        self.connections: set[HttpProtocol] = set()
        self.tick = 0
        self.stopping = False


class RequestRejected(Exception):
    """Raised inside a parser callback to abort the connection with a final response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        # per connection
        "state",
        "transport",
        "parser",
        "out",
        "queue",
        "closing",
        "reading_paused",
        "writing_paused",
        "last_tick",
        # per request
        "in_request",
        "request_tick",
        "url",
        "body",
        "body_size",
        "header_bytes",
        "partial_header_bytes",
        "content_length",
        "expect_continue",
        "keep_alive_header",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []  # responses to write when the current data_received returns
        self.queue: deque[list[object]] | None = (
            None  # [bytes | Task, keep_alive, http10] behind an unfinished response
        )
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.last_tick = state.tick
        self._reset_request()

    def _reset_request(self) -> None:
        self.in_request = False
        self.request_tick = 0
        self.url: bytes | None = None
        self.body: bytes | None = None
        self.body_size = 0
        self.header_bytes = 0
        self.partial_header_bytes = 0
        self.content_length = -1
        self.expect_continue = False
        self.keep_alive_header = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)
        self.state.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.state.stats.connections_closed += 1
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
        state = self.state
        self.last_tick = state.tick
        state.stats.bytes_received += len(data)
        if not self.in_request:
            self.in_request = True
            self.request_tick = state.tick
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            rejected = exc.__context__
            self._abort(rejected.response if isinstance(rejected, RequestRejected) else BAD_REQUEST)
        except httptools.HttpParserUpgrade:
            self._answer(UPGRADE_REFUSED, False)
        except httptools.HttpParserError:
            if not self.closing:  # data after a `Connection: close` request is the client's problem, not a 400
                self._abort(BAD_REQUEST)
        else:
            if self.url is not None and self.content_length == -1 and self.body is None:
                # Headers still incomplete after this chunk: bound what httptools buffers for them.
                self.partial_header_bytes += len(data)
                if self.partial_header_bytes > PARTIAL_HEADER_GUARD:
                    self._abort(HEADERS_TOO_LARGE)
        self._write_out()

    # -- httptools callbacks ----------------------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if self.url is None:
            self.url = url
        else:
            self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self.content_length = int(value)
        elif size == 6 and name.lower() == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        elif size == 10 and name.lower() == b"connection":
            self.keep_alive_header = value.lower() == b"keep-alive"

    def on_headers_complete(self) -> None:
        limits = self.state.limits
        if self.header_bytes > limits.max_header_bytes:
            raise RequestRejected(HEADERS_TOO_LARGE)
        if self.content_length > limits.max_body:
            raise RequestRejected(BODY_TOO_LARGE)
        if self.content_length == -1:
            self.content_length = 0  # marks "headers complete" for the partial-header guard
        if self.expect_continue:
            self._answer_interim(CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        size = self.body_size + len(chunk)
        if size > self.state.limits.max_body:
            raise RequestRejected(BODY_TOO_LARGE)
        self.body_size = size
        self.body = chunk if self.body is None else self.body + chunk

    def on_message_complete(self) -> None:
        if self.closing:
            return
        state = self.state
        url = self.url or b"/"
        body = self.body or b""
        http10_keep_alive = self.keep_alive_header
        self._reset_request()
        keep_alive = not state.stopping and self.parser.should_keep_alive()
        state.stats.requests += 1

        query_at = url.find(b"?")
        if query_at == -1:
            path, query = url, b""
        else:
            path, query = url[:query_at], url[query_at + 1 :]
        if path[:1] != b"/":  # absolute-form target (http://host/path)
            path = httptools.parse_url(url).path or b"/"

        target = state.router.resolve(self.parser.get_method(), path)
        if isinstance(target, Response):
            self._answer(target, keep_alive, http10_keep_alive)
            return
        try:
            result = target(path, query, body)
        except Exception:
            log.exception("event=handler_error path=%r", path)
            result = INTERNAL_ERROR
        if isinstance(result, Response):
            self._answer(result, keep_alive, http10_keep_alive)
        else:
            self._answer_later(asyncio.ensure_future(result), keep_alive, http10_keep_alive)

    # -- answering --------------------------------------------------------------------------------------------------

    def _render(self, response: Response, keep_alive: bool, http10_keep_alive: bool) -> bytes:
        statuses = self.state.stats.responses_by_status
        statuses[response.status] = statuses.get(response.status, 0) + 1
        renderer = self.state.renderer
        if http10_keep_alive and keep_alive:
            return renderer.render(response, True, http10_keep_alive=True)
        if response.cacheable:
            return renderer.render_cached(response, keep_alive)
        return renderer.render(response, keep_alive)

    def _answer(self, response: Response, keep_alive: bool, http10_keep_alive: bool = False) -> None:
        data = self._render(response, keep_alive, http10_keep_alive)
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

    def _answer_later(self, task: asyncio.Future[Response], keep_alive: bool, http10_keep_alive: bool) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append([task, keep_alive, http10_keep_alive])
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
                data = self._render(response, bool(entry[1]), bool(entry[2]))
            else:
                data = item  # type: ignore[assignment]
            queue.popleft()
            if data:
                self.transport.write(data)
                self.state.stats.bytes_sent += len(data)
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
        self.state.stats.bytes_sent += len(data)
        if self.closing and not self.queue:
            transport.close()

    def _abort(self, response: Response) -> None:
        """Answer a request we cannot parse or accept, then close: the byte stream is no longer trustworthy."""
        self._answer(response, False)

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

    def on_tick(self, tick: int) -> None:
        """Enforce timeouts; while the worker stops, close connections that have gone quiet."""
        if self.closing or self.transport is None:
            return
        limits = self.state.limits
        if self.in_request:
            if tick - self.request_tick >= limits.read_ticks:
                self._answer(REQUEST_TIMEOUT, False)
                self._write_out()
            return
        if self.queue:
            return
        idle_ticks = tick - self.last_tick
        # While stopping, a client that was quiet for a whole tick (> 1 s) is not mid-request: closing it cannot
        # cut a request in flight the way closing a connection that just got its answer could.
        if idle_ticks >= limits.keepalive_ticks or (self.state.stopping and idle_ticks >= 2):
            self.closing = True
            self.transport.close()
