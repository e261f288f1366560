"""The HTTP/1.1 connection: an asyncio.Protocol driven by one httptools parser's callbacks.

It owns keep-alive, pipelining (responses leave in request order, one write per batch of pipelined requests), the
size limits, flow control and the idle and read timeouts. It knows routes only as handlers; what they count is not
its business.

Rules it keeps:
1. Every request gets exactly one final response, in the order the requests arrived; nothing is handled (counted)
   that is not answered, and how the bytes are cut into reads changes no answer.
2. After a response that says `Connection: close`, nothing more is read or answered on that connection.
3. The head of a message (request line and headers, and separately its chunked trailers) is measured from the
   parser's callbacks, each header as `name: value` plus CRLF, and must fit in --max-header-bytes (431); a body
   must fit in --max-body (413, from Content-Length before the body arrives).
4. One read queues bounded work: while too many answers are pending (unfinished handlers, or a transport whose
   buffer is full), the unparsed rest of the read is kept, reading pauses, and parsing resumes in order.
5. No timer per request: the worker's one-second tick calls `on_tick`, which enforces both timeouts (to within
   a second) from counts the request path keeps anyway.
6. A small read that starts between messages is parsed first by a *lean* parser that has no header callbacks (each
   header costs httptools two bytes objects and a call into Python: about 8,000 instructions of a wrk request's
   ~30,000, measured with callgrind). Such a read is too small for any head or body in it to break a limit, so the
   headers matter only for Expect (reads holding `100-` skip the lean parser), for upgrades, and for a message the
   read does not finish. So when the read does not end cleanly between messages (a message cut by its end, an
   error, an upgrade), the full parser parses the same read again from its start, skipping the messages the lean
   parser handled (their headers could not have changed their answers): every answer is the full parser's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

import httptools

from fastcount.server.responses import CONTINUE, Response, ResponseRenderer, constant_error

if TYPE_CHECKING:
    from fastcount.observability.stats import WorkerStats
    from fastcount.server.routing import Router, RouteState

log = logging.getLogger(__name__)

MAX_PENDING_ANSWERS = 64  # unfinished (async) answers at which we stop parsing and reading
FEED_SLICE = 4096  # a larger read is parsed this much at a time, so rule 4 is checked between slices
# "<method> <target> HTTP/1.1\r\n" without method and target, plus the blank line that ends the head.
REQUEST_LINE_OVERHEAD = 14
MAX_METHOD_LENGTH = 24  # longer than any method llhttp knows; the method is measured only near the limit
# Rule 6: a head measures at most 5/4 of its bytes (each header line of n bytes, 4 at least, counts n + 1 when its
# colon has no space after it), so no head in a read of max_header_bytes * 4/5 bytes can be too large.
LEAN_HEAD_RATIO = (4, 5)

BAD_REQUEST = constant_error(400, "malformed HTTP request")
BODY_TOO_LARGE = constant_error(413, "request body too large")
HEADERS_TOO_LARGE = constant_error(431, "request header section too large")
REQUEST_TIMEOUT = constant_error(408, "request not received in time")
INTERNAL_ERROR = constant_error(500, "internal error")


@dataclass(frozen=True)
class ConnectionLimits:
    max_body: int
    max_header_bytes: int
    keepalive_ticks: int  # whole ticks (seconds) an idle keep-alive connection lives
    read_ticks: int  # whole ticks a client has to finish sending one request
    tcp_nodelay: bool = True


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = (
        "connection_closed", "connections", "lean_max", "limits", "renderer", "router", "stats", "stopping",
        "watched_header_lengths",
    )  # fmt: skip

    def __init__(self, router: Router, limits: ConnectionLimits, stats: WorkerStats) -> None:
        self.router = router
        self.renderer = ResponseRenderer(router.routes)
        self.limits = limits
        self.stats = stats
        self.connections: set[HttpProtocol] = set()
        self.stopping = False
        self.connection_closed: Callable[[], None] | None = None  # the worker's accept loop counts connections
        # Header names the protocol looks at; a name of another length is only measured, never lower-cased.
        watched = {b"content-length", b"transfer-encoding", b"expect", b"upgrade", *router.wanted_headers}
        self.watched_header_lengths = frozenset(len(name) for name in watched)
        # Rule 6: the largest read the lean parser may take; none when some route wants request headers.
        numerator, denominator = LEAN_HEAD_RATIO
        lean_max = min(FEED_SLICE, limits.max_header_bytes * numerator // denominator, limits.max_body)
        self.lean_max = 0 if router.wanted_headers else lean_max


class RequestRejected(Exception):
    """Raised inside a parser callback to abort the connection with a final response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class LeanParseAbandoned(Exception):
    """Raised in a lean parser callback: the full parser must parse this read (rule 6)."""


class LeanCallbacks:
    """What the lean parser calls (rule 6): no header callbacks, and no measuring (nothing in its reads can break a
    limit)."""

    __slots__ = ("on_body", "on_message_begin", "on_message_complete", "on_url")

    def __init__(self, protocol: HttpProtocol) -> None:
        self.on_message_begin = protocol.on_message_begin
        self.on_url = protocol.on_lean_url
        self.on_body = protocol.on_lean_body
        self.on_message_complete = protocol.on_lean_message_complete


class HttpProtocol(asyncio.Protocol):
    """One client connection.

    One parser sees every byte. Sizes come from its callbacks: `on_url` and `on_header` add up the head exactly as
    rule 3 says, whatever the reads. The one thing callbacks do not show is a header line still being received; a
    read that produces no callback at all lies wholly inside such a line (httptools buffers it), so those reads are
    added as they come (`unseen_head_bytes`) and a header line that never ends is cut off at the limit too.
    """

    __slots__ = (
        # per connection
        "state",
        "transport",
        "parser",
        "lean_parser",
        "lean_max",
        "lean_skip",
        "max_head_bytes",
        "max_body",
        "body_limit",
        "watched_header_lengths",
        "out",
        "queue",
        "unparsed",
        "closing",
        "eof",
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
        "head_bytes",
        "unseen_head_bytes",
        "headers_done",
        "content_length",
        "expect_continue",
        "transfer_encoding",
        "upgrade_requested",
        "replay_head",
        "replaying",
        "request_headers",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)  # the full parser
        self.lean_max = state.lean_max
        self.lean_parser = httptools.HttpRequestParser(LeanCallbacks(self)) if self.lean_max else None
        self.lean_skip = 0  # messages of the read being parsed again that the lean parser already handled
        self.max_head_bytes = state.limits.max_header_bytes
        self.max_body = state.limits.max_body
        self.body_limit = 0  # of the current request, looked up only past max_body (a route may allow more); 0: not yet
        self.watched_header_lengths = state.watched_header_lengths
        self.out: list[bytes] = []  # responses to write when the current data_received returns
        # [bytes | Task, keep_alive, http10, route] entries waiting behind an unfinished (async) response
        self.queue: deque[list[object]] | None = None
        self.unparsed: bytes | memoryview | None = None  # received, held back from the parser by rule 4
        self.closing = False
        self.eof = False  # the client half-closed while answers were still due
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
        self.head_bytes = 0  # of the head being received: request line and headers, then trailers (rule 3)
        self.unseen_head_bytes = 0  # bytes of reads that produced no callback, inside a header line (see above)
        self.headers_done = False
        self.content_length = -1
        self.expect_continue = False
        self.transfer_encoding: bytes | None = None
        self.upgrade_requested = False
        self.replay_head: bytes | None = None  # a request llhttp took for an upgrade, rebuilt as a plain one
        self.replaying = False
        self.request_headers: dict[bytes, bytes] | None = None  # the ones some route wants, lower-case names

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
        state = self.state
        state.connections.discard(self)
        state.stats.connections_closed += 1
        if state.connection_closed is not None:  # its descriptor is free again: the worker may accept another
            state.connection_closed()
        self.publish_counts()
        self.closing = True
        self.unparsed = None
        if self.queue:
            for entry in self.queue:
                if isinstance(entry[0], asyncio.Future):
                    entry[0].cancel()
        self.queue = None

    def eof_received(self) -> bool | None:
        if self.queue or self.unparsed is not None:  # half-closed with answers still due: send them, then close
            self.eof = True
            return True
        return None

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._resume_parsing()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.bytes_in += len(data)
        sampled = not self.requests & 15  # time one read in 16 or so: the clock is not free
        if sampled:
            started = perf_counter()
        try:
            # (`partition`, not `in` nor `find`: CPython 3.11's `bytes in bytes` first tries the needle as an integer
            # and builds a TypeError it then drops, about 1,300 of its 1,850 instructions, and `find` parses its
            # arguments into a tuple, ~470 instructions more than `partition`, which takes one.)
            if (
                len(data) <= self.lean_max
                and not self.in_message
                and self.unparsed is None
                and not data.partition(b"100-")[1]
            ):
                # The common case, inline: whole requests in one small read, handled by the lean parser (rule 6).
                handled_before = self.requests
                lean_error = None
                try:
                    self.lean_parser.feed_data(data)  # type: ignore[union-attr]
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
                    lean_error = error
                # Outside the except clause: an error of the full parser's must not be chained to the lean one
                # (httptools' `raise` would replace its __context__, turning a 413 into a 500).
                if lean_error is not None or self.in_message:  # the read did not end cleanly between messages
                    self._lean_abandoned(data, handled_before, lean_error)
            elif len(data) <= FEED_SLICE and self.unparsed is None:
                self._feed(data)
            else:
                self._feed_sliced(data)
        except Exception:  # a bug of ours: answer what was handled, then give up on this connection (rule 1)
            log.exception("event=protocol_error")
            self._answer(INTERNAL_ERROR, False)
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

    # -- feeding the parser -----------------------------------------------------------------------------------------

    def _lean_abandoned(self, data: bytes, handled_before: int, error: Exception | None) -> None:
        """Rule 6: the read did not end cleanly between messages (`error` says why, if it was not the read's end).
        The lean parser handled the messages it completed; the full parser parses the read again from its start,
        skipping those."""
        if isinstance(error, httptools.HttpParserCallbackError) and not isinstance(
            error.__context__, (LeanParseAbandoned, RequestRejected)
        ):
            raise error  # a bug of ours: data_received answers 500
        self.lean_skip = self.requests - handled_before
        self.in_message = False
        self.url = self.body = None
        self.body_size = self.head_bytes = 0
        self.lean_parser = httptools.HttpRequestParser(LeanCallbacks(self))  # the old one stopped mid-message
        self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse one slice of input; afterwards, bound a header line that is still being received (rule 3)."""
        continuing = self.in_message
        if continuing:  # what the callbacks will have changed if they run at all
            mark = self.requests, self.head_bytes + self.body_size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            upgrade_at: int = upgrade.args[0]
        except httptools.HttpParserError as error:
            self._parse_failed(error)
            return
        else:
            upgrade_at = -1
        if upgrade_at >= 0:  # outside the except clause: errors of the rest must not be chained to the upgrade
            self._upgraded(data, upgrade_at)
            return
        if self.in_message and not self.closing:
            if continuing and mark == (self.requests, self.head_bytes + self.body_size):
                self.unseen_head_bytes += len(data)  # no callback: all of it inside one header line
            else:
                self.unseen_head_bytes = 0
            if self.head_bytes + self.unseen_head_bytes > self.max_head_bytes:
                self._answer(HEADERS_TOO_LARGE, False)

    def _feed_sliced(self, data: bytes | memoryview) -> None:
        """A large read, or one that arrived behind held-back input: parse it slice by slice while rule 4 allows."""
        if self.unparsed is not None:
            self.unparsed = bytes(self.unparsed) + bytes(data)  # keep the order; reading is paused, so rarely
            return
        view = memoryview(data)
        for start in range(0, len(view), FEED_SLICE):
            if self.closing:
                return
            if self._too_much_pending():
                self.unparsed = view[start:]
                self._update_reading()
                return
            self._feed(view[start : start + FEED_SLICE])
            if self.out:  # write per slice, so a transport whose buffer fills can tell us before the next one
                self._write_out()

    def _too_much_pending(self) -> bool:
        return self.writing_paused or (self.queue is not None and len(self.queue) >= MAX_PENDING_ANSWERS)

    def _resume_parsing(self) -> None:
        """Answers went out: parse what was held back (it may be held again), then read again if rule 4 allows."""
        if self.unparsed is not None and not self._too_much_pending() and not self.closing:
            rest, self.unparsed = self.unparsed, None
            try:
                self._feed_sliced(rest)
            except Exception:
                log.exception("event=protocol_error")
                self._answer(INTERNAL_ERROR, False)
            self._write_out()
        if self.eof and not self.queue and self.unparsed is None and self.transport is not None:
            self.closing = True
            self.transport.close()
            return
        self._update_reading()

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        if isinstance(error, httptools.HttpParserCallbackError):
            rejected = error.__context__
            if isinstance(rejected, RequestRejected):
                self._answer(rejected.response, False)
            else:  # a bug of ours inside a callback: the same 500 as anywhere else, however the bytes were cut
                log.error("event=protocol_error", exc_info=rejected)
                self._answer(INTERNAL_ERROR, False)
        elif not self.closing:  # data after a `Connection: close` request is the client's problem, not a 400
            self._answer(BAD_REQUEST, False)

    def _upgraded(self, data: bytes | memoryview, offset: int) -> None:
        """llhttp stopped after a request it takes for a protocol switch (Upgrade with `Connection: upgrade`, or
        CONNECT) and left the rest unparsed, the body of an Upgrade request included. We switch to nothing: a fresh
        parser goes on with the rest, and an Upgrade request is first replayed to it as a plain request (its line,
        framing and connection headers; the route's headers were already collected), so that its body is read and
        the request answered like any other."""
        self.parser = httptools.HttpRequestParser(self)
        head, self.replay_head = self.replay_head, None
        if head is not None and not self.closing:
            self.replaying = True
            try:
                self.parser.feed_data(head)
            except httptools.HttpParserError as error:
                self._parse_failed(error)
                return
            finally:
                self.replaying = False
        if not self.closing and offset < len(data):
            self._feed(data[offset:])

    # -- httptools callbacks ----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        if self.url is None:
            self.url = url
            self.head_bytes = len(url) + REQUEST_LINE_OVERHEAD
        else:  # the target arrived in pieces; the end-of-read check bounds it
            self.url += url
            self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        name_length = len(name)
        head_bytes = self.head_bytes + name_length + len(value) + 4  # ": " and CRLF
        if head_bytes > self.max_head_bytes:
            raise RequestRejected(HEADERS_TOO_LARGE)
        self.head_bytes = head_bytes
        if name_length in self.watched_header_lengths and not self.headers_done:  # trailers frame nothing
            name = name.lower()
            if name == b"content-length":  # llhttp has checked it is a number
                self.content_length = int(value)
            else:
                self._other_header(name, value)

    def _other_header(self, name: bytes, value: bytes) -> None:
        if name == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        elif name == b"upgrade":
            self.upgrade_requested = True
        elif name == b"transfer-encoding":
            self.transfer_encoding = value
        if name in self.state.router.wanted_headers:
            headers = self.request_headers
            if headers is None:
                self.request_headers = {name: value}
            else:  # a repeated header is one comma-separated list (RFC 9110, 5.3)
                headers[name] = headers[name] + b", " + value if name in headers else value

    def on_headers_complete(self) -> None:
        self.headers_done = True
        head_bytes = self.head_bytes
        if (
            head_bytes + MAX_METHOD_LENGTH > self.max_head_bytes  # the exact measure only near the limit
            and not self.replaying
            and head_bytes + len(self.parser.get_method()) > self.max_head_bytes
        ):
            raise RequestRejected(HEADERS_TOO_LARGE)
        self.head_bytes = 0  # from here on it measures the trailers of a chunked body
        if self.content_length > self.max_body and not self._allows_body(self.content_length):
            raise RequestRejected(BODY_TOO_LARGE)
        if self.expect_continue:
            self.expect_continue = False
            if self.parser.get_http_version() != "1.0":
                self._answer_interim(CONTINUE)
        if self.upgrade_requested and self.parser.should_upgrade():
            self.replay_head = self._plain_head()

    def _allows_body(self, size: int) -> bool:
        """A body past --max-body: allowed up to the limit its route declared (POST /events takes bulk arrays)."""
        limit = self.body_limit
        if not limit:
            declared = self.state.router.body_limit(self.parser.get_method(), self.url or b"/")
            limit = self.body_limit = max(declared, self.max_body)
        return size <= limit

    def _plain_head(self) -> bytes:
        """The head of the current request as a request with no upgrade in it (see `_upgraded`)."""
        parser = self.parser
        version = parser.get_http_version().encode()
        lines = [parser.get_method(), b" ", self.url or b"/", b" HTTP/", version, b"\r\n"]
        if self.transfer_encoding is not None:
            lines.append(b"Transfer-Encoding: " + self.transfer_encoding + b"\r\n")
        elif self.content_length > 0:
            lines.append(b"Content-Length: %d\r\n" % self.content_length)
        if not parser.should_keep_alive():
            lines.append(b"Connection: close\r\n")
        elif version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.url = None  # the replay brings it back
        self.content_length = -1
        self.transfer_encoding = None
        self.upgrade_requested = False
        return b"".join(lines)

    def on_lean_url(self, url: bytes) -> None:
        # Whole: a lean read holds whole messages, and llhttp cuts a span only at a read's end (a later llhttp that
        # did otherwise would fail tests/test_protocol_properties.py, which checks every answer against a model).
        self.url = url

    def on_body(self, chunk: bytes) -> None:
        size = self.body_size + len(chunk)
        if size > self.max_body and not self._allows_body(size):  # (never on the lean parser: lean_max <= max_body)
            raise RequestRejected(BODY_TOO_LARGE)
        self.body_size = size
        self.body = chunk if self.body is None else self.body + chunk

    def on_lean_body(self, chunk: bytes) -> None:
        self.body = chunk if self.body is None else self.body + chunk  # chunked: several in one read

    def on_message_complete(self) -> None:
        if self.closing or self.replay_head is not None:  # closing, or a request to replay (see `_upgraded`)
            return
        url = self.url or b"/"
        body = self.body or b""
        request_headers = self.request_headers
        # Per-request state resets here, in one place (expect_continue and head_bytes reset where they are used).
        self.in_message = False
        self.url = None
        if self.body is not None:
            self.body = None
            self.body_size = 0
        self.headers_done = False
        self.content_length = -1
        self.body_limit = 0
        if request_headers is not None or self.upgrade_requested or self.transfer_encoding is not None:
            self.request_headers = self.transfer_encoding = None
            self.upgrade_requested = False
        if self.lean_skip:  # the lean parser handled it before giving this read to us (rule 6)
            self.lean_skip -= 1
            return
        parser = self.parser
        if self.http10 is None:
            self.http10 = parser.get_http_version() == "1.0"
        self._dispatch(url, body, parser.get_method(), parser.should_keep_alive(), request_headers)

    def on_lean_message_complete(self) -> None:
        """The lean parser's (rule 6). An upgrade is left to the full parser, which replays it as a plain request."""
        parser = self.lean_parser
        if parser.should_upgrade():  # type: ignore[union-attr]
            raise LeanParseAbandoned
        url = self.url or b"/"
        body = self.body or b""
        self.in_message = False
        self.url = self.body = None
        if self.http10 is None:
            self.http10 = parser.get_http_version() == "1.0"  # type: ignore[union-attr]
        self._dispatch(url, body, parser.get_method(), parser.should_keep_alive(), None)  # type: ignore[union-attr]

    def _dispatch(
        self, url: bytes, body: bytes, method: bytes, keep_alive: bool, request_headers: dict[bytes, bytes] | None
    ) -> None:
        # The hot path: written flat, because every call and attribute here is paid on every request.
        if self.closing:  # rule 2
            return
        state = self.state
        self.requests += 1
        keep_alive = keep_alive and not state.stopping
        http10_keep_alive = self.http10 is True and keep_alive

        exact = state.router.exact
        table = exact.get(url)
        route = table.get(method) if table is not None else None
        path, query = url, b""
        if route is None:
            # A query string: its path alone is most often an exact route (GET /api/verve/accept?id=...).
            # (partition: one call, no argument parsing; find and two slices cost ~60 ns more)
            path, question, query = url.partition(b"?")  # (both set again below if it is no exact route)
            if question:
                table = exact.get(path)
                route = table.get(method) if table is not None else None
            if route is None:
                path, query, target = state.router.resolve_target(method, url)
                if isinstance(target, Response):
                    router = state.router  # a HEAD's 405 (or 404) goes without the body, as every HEAD answer does
                    unmatched = router.unmatched_head if method == b"HEAD" else router.unmatched
                    self._answer(target, keep_alive, http10_keep_alive, unmatched)
                    return
                route = target
        try:
            if route.headers:
                result = route.handler(path, query, body, _headers_for(route, request_headers))
            else:
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
        return renderer.render(response, keep_alive, http10_keep_alive, route.without_body)

    def _answer(
        self, response: Response, keep_alive: bool, http10_keep_alive: bool = False, route: RouteState | None = None
    ) -> None:
        if self.closing:  # rule 2: the answer that closed the connection was the last one
            return
        data = self._render(response, keep_alive, http10_keep_alive, route or self.state.router.invalid)
        if self.queue:
            self.queue.append([data, keep_alive, False])
        else:
            self.out.append(data)
        if not keep_alive:
            self.closing = True
            self.unparsed = None

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
                    return
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
        self.queue = None  # back to the direct path: nothing is waiting
        self._resume_parsing()

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
        should_pause = self.unparsed is not None or self._too_much_pending()
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
        # Input we hold back (rule 4) is our delay, not the client's: it does not count towards the read timeout.
        stalled = self.in_message and not self.requests and self.unparsed is None
        self.stalled_ticks = self.stalled_ticks + 1 if stalled else 0
        self.publish_counts()
        if self.closing or self.transport is None:
            return
        limits = self.state.limits
        if self.in_message:
            if self.stalled_ticks > limits.read_ticks:
                self._answer(REQUEST_TIMEOUT, False)
                self._write_out()
            return
        if self.queue or self.unparsed is not None:
            return
        # While stopping, a client that sent nothing for a whole tick (a second) is not mid-request: closing it
        # cannot cut a request in flight the way closing a connection that just got its answer could.
        if self.quiet_ticks >= limits.keepalive_ticks or (self.state.stopping and self.quiet_ticks >= 1):
            self.closing = True
            self.transport.close()


def _headers_for(route: RouteState, received: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """The headers a route asked for, of those the request carried."""
    if not received:
        return {}
    return {name: received[name] for name in route.headers if name in received}
