"""Routes: how a feature tells the server which handler answers a method and path.

A handler takes (path, query, body) as bytes and returns a Response, or an awaitable of one when it must wait (a
database read). The router resolves a request target to a handler or to a ready 404/405 response; it knows nothing of
what the handlers do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httptools

from fastcount.server.responses import Response, constant_error

HandlerResult = Response | Awaitable[Response]
Handler = Callable[[bytes, bytes, bytes], HandlerResult]


@dataclass(frozen=True)
class Route:
    method: bytes
    path: bytes
    handler: Handler
    prefix: bool = False  # match every path that starts with `path`


NOT_FOUND = constant_error(404, "not found")


class Router:
    __slots__ = ("_method_not_allowed", "_prefixes", "exact")

    def __init__(self, routes: Iterable[Route]) -> None:
        self.exact: dict[bytes, dict[bytes, Handler]] = {}
        self._prefixes: list[tuple[bytes, dict[bytes, Handler]]] = []
        for route in routes:
            if route.prefix:
                table = next((t for p, t in self._prefixes if p == route.path), None)
                if table is None:
                    table = {}
                    self._prefixes.append((route.path, table))
            else:
                table = self.exact.setdefault(route.path, {})
            if route.method in table:
                raise ValueError(f"duplicate route {route.method!r} {route.path!r}")
            table[route.method] = route.handler
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)  # longest prefix wins
        self._method_not_allowed: dict[int, Response] = {}

    def methods_for(self, path: bytes) -> dict[bytes, Handler] | None:
        table = self.exact.get(path)
        if table is not None:
            return table
        for prefix, table in self._prefixes:
            if path.startswith(prefix):
                return table
        return None

    def resolve_target(self, method: bytes, target: bytes) -> tuple[bytes, bytes, Handler | Response]:
        """Split a request target into path and query and resolve the path. `exact` alone serves the hot path."""
        query_at = target.find(b"?")
        if query_at == -1:
            path, query = target, b""
        else:
            path, query = target[:query_at], target[query_at + 1 :]
        if path[:1] != b"/":  # absolute-form target (http://host/path?query)
            parsed = httptools.parse_url(target)
            path, query = parsed.path or b"/", parsed.query or b""
        return path, query, self.resolve(method, path)

    def resolve(self, method: bytes, path: bytes) -> Handler | Response:
        table = self.methods_for(path)
        if table is None:
            return NOT_FOUND
        handler = table.get(method)
        if handler is not None:
            return handler
        return self._not_allowed(table)

    def _not_allowed(self, table: dict[bytes, Handler]) -> Response:
        response = self._method_not_allowed.get(id(table))
        if response is None:
            allow = b", ".join(sorted(table))
            response = constant_error(405, "method not allowed", ((b"Allow", allow),))
            self._method_not_allowed[id(table)] = response
        return response
