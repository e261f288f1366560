"""Routes: how a feature tells the server which handler answers a method and path.

A handler takes (path, query, body) as bytes and returns a Response, or an awaitable of one when it must wait (a
database read). A route that names request headers (`headers=(b"x-id",)`, lower-case) is called with a fourth
argument, a dict of those it received; the protocol collects only names some route asked for. The router resolves
a request target to a RouteState (the handler plus its answer counts and cached answer bytes) or to a ready 404/405
response; it knows nothing of what the handlers do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httptools

from fastcount.server.responses import Response, constant_error

HandlerResult = Response | Awaitable[Response]
Handler = Callable[[bytes, bytes, bytes], HandlerResult]
HeadersHandler = Callable[[bytes, bytes, bytes, dict[bytes, bytes]], HandlerResult]
# Headers that frame the message belong to the protocol; a route cannot ask for them.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True)
class Route:
    method: bytes
    path: bytes
    handler: Handler | HeadersHandler
    prefix: bool = False  # match every path that starts with `path`
    name: str = ""  # the `route` label of metrics; default "METHOD path"
    headers: tuple[bytes, ...] = ()  # lower-case names of request headers the handler is given, as a 4th argument
    max_body: int = 0  # a larger body limit than the server's --max-body for this route alone (exact routes); 0: none
    head: bool = False  # a GET route that also answers HEAD: the same answer without its body (safe handlers only)


def _no_handler(path: bytes, query: bytes, body: bytes) -> Response:
    raise AssertionError("pseudo-routes have no handler")


class RouteState:
    """A route as the protocol uses it: its handler, its answers counted by status, and the bytes of its constant
    answers for the current second (entries are [bytes, times served], harvested into `answers` on each tick)."""

    __slots__ = ("answers", "close_cache", "handler", "headers", "keep_alive_cache", "name", "without_body")

    def __init__(
        self, name: str, handler: Callable[..., HandlerResult] = _no_handler, headers: tuple[bytes, ...] = ()
    ) -> None:
        self.name = name
        self.handler = handler
        self.headers = headers  # empty: called with (path, query, body); else also a dict of these headers
        self.answers: dict[int, int] = {}
        self.keep_alive_cache: dict[Response, list[bytes | int]] = {}
        self.close_cache: dict[Response, list[bytes | int]] = {}
        self.without_body = False  # HEAD: every answer is rendered without its body (Content-Length kept)

    def count(self, status: int) -> None:
        self.answers[status] = self.answers.get(status, 0) + 1


def _answering_head(get: RouteState) -> RouteState:
    """The route answering HEAD where `get` answers GET: the same handler and answers, without the body; counted as
    `get`'s (one `answers`)."""
    head = RouteState(get.name, get.handler, get.headers)
    head.answers = get.answers
    head.without_body = True
    return head


NOT_FOUND = constant_error(404, "not found")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """A request target's path and query (origin form `/path?query`, or absolute form `http://host/path?query`)."""
    query_at = target.find(b"?")
    if query_at == -1:
        path, query = target, b""
    else:
        path, query = target[:query_at], target[query_at + 1 :]
    if path[:1] != b"/":  # absolute-form target
        parsed = httptools.parse_url(target)
        path, query = parsed.path or b"/", parsed.query or b""
    return path, query


class Router:
    __slots__ = (
        "_method_not_allowed", "_prefixes", "body_limits", "exact", "invalid", "routes", "unmatched", "unmatched_head",
        "wanted_headers",
    )  # fmt: skip

    def __init__(self, routes: Iterable[Route]) -> None:
        self.exact: dict[bytes, dict[bytes, RouteState]] = {}
        self._prefixes: list[tuple[bytes, dict[bytes, RouteState]]] = []
        self.unmatched = RouteState("unmatched")  # 404 and 405
        self.invalid = RouteState("invalid")  # requests refused before routing: 400, 408, 413, 431
        self.unmatched_head = _answering_head(self.unmatched)  # 404 and 405 to HEAD: no body
        self.routes: list[RouteState] = [self.unmatched, self.unmatched_head, self.invalid]
        wanted: set[bytes] = set()
        self.body_limits: dict[tuple[bytes, bytes], int] = {}  # (method, path) -> a route's own body limit
        for route in routes:
            if route.max_body:
                if route.prefix:
                    raise ValueError(f"prefix route {route.path!r} cannot set max_body")
                self.body_limits[(route.method, route.path)] = route.max_body
            for header in route.headers:
                if header != header.lower() or header in FRAMING_HEADERS:
                    raise ValueError(f"route {route.method!r} {route.path!r} cannot ask for header {header!r}")
            wanted.update(route.headers)
            if route.prefix:
                table = next((t for p, t in self._prefixes if p == route.path), None)
                if table is None:
                    table = {}
                    self._prefixes.append((route.path, table))
            else:
                table = self.exact.setdefault(route.path, {})
            if route.method in table:
                raise ValueError(f"duplicate route {route.method!r} {route.path!r}")
            state = RouteState(
                route.name or f"{route.method.decode()} {route.path.decode()}", route.handler, route.headers
            )
            table[route.method] = state
            self.routes.append(state)
            if route.head:
                if route.method != b"GET" or b"HEAD" in table:
                    raise ValueError(f"route {route.method!r} {route.path!r} cannot answer HEAD")
                head = table[b"HEAD"] = _answering_head(state)
                self.routes.append(head)
        self.wanted_headers = frozenset(wanted)  # what the protocol collects from requests: the union of the wishes
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)  # longest prefix wins
        self._method_not_allowed: dict[int, Response] = {}

    def body_limit(self, method: bytes, target: bytes) -> int:
        """The body limit a route declared for this request (0: none, the server's --max-body applies)."""
        if not self.body_limits:
            return 0
        return self.body_limits.get((method, split_target(target)[0]), 0)

    def methods_for(self, path: bytes) -> dict[bytes, RouteState] | None:
        table = self.exact.get(path)
        if table is not None:
            return table
        for prefix, table in self._prefixes:
            if path.startswith(prefix):
                return table
        return None

    def resolve_target(self, method: bytes, target: bytes) -> tuple[bytes, bytes, RouteState | Response]:
        """Split a request target into path and query and resolve the path. `exact` alone serves the hot path."""
        path, query = split_target(target)
        return path, query, self.resolve(method, path)

    def resolve(self, method: bytes, path: bytes) -> RouteState | Response:
        table = self.methods_for(path)
        if table is None:
            return NOT_FOUND
        route = table.get(method)
        if route is not None:
            return route
        return self._not_allowed(table)

    def _not_allowed(self, table: dict[bytes, RouteState]) -> Response:
        response = self._method_not_allowed.get(id(table))
        if response is None:
            allow = b", ".join(sorted(table))
            response = constant_error(405, "method not allowed", ((b"Allow", allow),))
            self._method_not_allowed[id(table)] = response
        return response
