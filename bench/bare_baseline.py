"""The Python floor: the least a uvloop + httptools server can do for POST /increment, as a benchmark contender.

One process, one protocol: httptools with no header callbacks, the body parsed with orjson, the key added to a dict,
a constant 202 written. No limits, no journal, no flush, no stats, no routing: nothing fastcount could leave out.
What fastcount costs above this is ours; what this costs above nginx is Python's (and the design's) floor.

    python bench/bare_baseline.py PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys

import httptools
import orjson
import uvloop

ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
pending: dict[str, int] = {}


class Bare(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        document = orjson.loads(self.body)
        self.body = b""
        key, value = document["key"], document["value"]
        pending[key] = pending.get(key, 0) + value
        self.transport.write(ACCEPTED)  # type: ignore[union-attr]


async def serve(port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await asyncio.get_running_loop().create_server(Bare, sock=sock, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
