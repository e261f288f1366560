"""HTTP responses: the Response value handlers return, and the renderer that turns it into wire bytes.

Constant responses (the 202 of every increment) are rendered once per second, when the cached Date header changes,
and then served as ready bytes; everything else is rendered on demand. The renderer owns no socket.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from fastcount.server.routing import RouteState

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity, a cheap cache key
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b""
    headers: Headers = ()
    cacheable: bool = False  # a constant the renderer may keep as bytes until the Date header changes


def json_response(status: int, document: object, headers: Headers = (), cacheable: bool = False) -> Response:
    return Response(status, orjson.dumps(document), b"application/json", headers, cacheable)


def constant_error(status: int, message: str, headers: Headers = ()) -> Response:
    """An error answer built once, at import or start-up; the renderer keeps its bytes."""
    return json_response(status, {"error": message}, headers, cacheable=True)


def json_problem(error: ValueError) -> str:
    """A JSON decoder's reason, for a client: orjson's, except that a body that is not UTF-8 is said so plainly
    (orjson adds 'surrogates not allowed' and a position that is not where the bad byte is)."""
    text = str(error)
    return "not valid UTF-8" if "not valid UTF-8" in text else text


def error_response(status: int, message: str) -> Response:
    """An error answer whose message depends on the request; rendered each time."""
    return json_response(status, {"error": message})


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1"))


STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ResponseRenderer:
    """Renders responses with a Date header refreshed once per second by `tick`.

    Constant responses are cached per route as [bytes, times served] entries: the hot path counts what it serves by
    bumping the entry, and `tick` moves those counts into each route's answers by status.
    """

    __slots__ = ("_current_second", "date_line", "routes")

    def __init__(self, routes: Sequence[RouteState]) -> None:
        self.routes = routes
        self._current_second = -1
        self.date_line = b""
        self.tick()

    def tick(self) -> None:
        second = int(time.time())
        new_second = second != self._current_second
        if new_second:
            self._current_second = second
            self.date_line = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
        for route in self.routes:
            for cache in (route.keep_alive_cache, route.close_cache):
                for response, entry in cache.items():
                    if entry[1]:
                        route.answers[response.status] = route.answers.get(response.status, 0) + int(entry[1])
                        entry[1] = 0
                if new_second:
                    cache.clear()

    def cache_entry(self, route: RouteState, response: Response, keep_alive: bool) -> list[bytes | int]:
        """The [bytes, served] entry of a constant response, rendered on first use this second."""
        cache = route.keep_alive_cache if keep_alive else route.close_cache
        entry = cache.get(response)
        if entry is None:
            entry = cache[response] = [self.render(response, keep_alive, without_body=route.without_body), 0]
        return entry

    def render(
        self, response: Response, keep_alive: bool, http10_keep_alive: bool = False, without_body: bool = False
    ) -> bytes:
        """The answer's bytes; `without_body` (HEAD): the head GET would get, its Content-Length included."""
        status_line = STATUS_LINES.get(response.status) or _status_line(response.status)
        parts = [status_line, self.date_line, b"Content-Length: %d\r\n" % len(response.body)]
        if response.content_type:
            parts.append(b"Content-Type: " + response.content_type + b"\r\n")
        for name, value in response.headers:
            parts.append(name + b": " + value + b"\r\n")
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif http10_keep_alive:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not without_body:
            parts.append(response.body)
        return b"".join(parts)
